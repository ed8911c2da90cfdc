"""The launcher's argv, run dir and pre-flight checks, without starting any rank."""

from __future__ import annotations

import json
import shlex
import shutil

import pytest
import yaml

from launcher.cli import main
from launcher.cluster import Cluster, Host
from launcher.launch import LaunchError, deepspeed_argv, launch_argv, srun_argv, stage_data


def test_deepspeed_argv_local_and_hostfile():
    local = Cluster([Host("localhost", 2)], "local", master_port=29555)
    assert deepspeed_argv(local, "/r/config.yaml", "/repo/training/train.py") == [
        "deepspeed", "--num_gpus", "2", "--master_port", "29555", "/repo/training/train.py",
        "--config", "/r/config.yaml"]
    multi = Cluster([Host("n1", 8), Host("n2", 8)], "hostfile", master_addr="n1")
    assert deepspeed_argv(multi, "/r/config.yaml", "t.py", hostfile_path="/r/hostfile") == [
        "deepspeed", "--hostfile", "/r/hostfile", "--master_addr", "n1", "--master_port", "29500", "t.py",
        "--config", "/r/config.yaml"]
    one_local = Cluster([Host("localhost", 2)], "hostfile", master_addr="127.0.0.1")
    assert deepspeed_argv(one_local, "c.yaml", "t.py", hostfile_path="hf")[:6] == [
        "deepspeed", "--hostfile", "hf", "--master_addr", "127.0.0.1", "--no_ssh_check"]
    with pytest.raises(ValueError):
        deepspeed_argv(multi, "/r/config.yaml")


def test_srun_argv_one_task_per_gpu():
    cluster = Cluster([Host("n1", 4), Host("n2", 4)], "slurm", master_addr="n1")
    argv = srun_argv(cluster, "/r/config.yaml", "t.py", python="py")
    assert argv == ["srun", "--nodes=2", "--ntasks-per-node=4", "--ntasks=8", "--kill-on-bad-exit=0", "--wait=60", "py",
                    "-m", "launcher.slurm_exec", "t.py", "--config", "/r/config.yaml"]
    assert launch_argv(cluster, "/r/config.yaml")[0] == "srun"


def test_dry_run_writes_the_run_dir_and_starts_nothing(make_run, capsys):
    run_yaml = make_run()
    assert main(["launch", str(run_yaml), "--num-gpus", "2", "--dry-run", "--set", "train.lr=5e-4"]) == 0
    out = capsys.readouterr().out
    raw = yaml.safe_load(run_yaml.read_text())
    run_dir = run_yaml.parent / "out"
    assert "dry run: nothing started" in out
    command = (run_dir / "command.txt").read_text().strip()
    assert f"command: {command}" in out
    assert shlex.split(command)[:3] == ["deepspeed", "--num_gpus", "2"]
    assert shlex.split(command)[-2:] == ["--config", str((run_dir / "config.yaml").resolve())]
    assert command in (run_dir / "launch.sh").read_text()
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["train"]["lr"] == 5e-4 and saved["data"]["output_dir"] == raw["data"]["output_dir"]
    ds = json.loads((run_dir / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 2 * 1 * 2 and ds["zero_optimization"]["stage"] == 3
    assignment = json.loads((run_dir / "assignment.json").read_text())
    train, validation = assignment["splits"]["train"], assignment["splits"]["validation"]
    assert assignment["world_size"] == 2 and train["order"].startswith("global")
    assert train["global_batch_size"] == 4 and train["sequences_per_rank_per_step"] == 2
    assert len(validation["ranges"]) == 2 and validation["sequences_per_rank"][0] == validation["sequences_per_rank"][1] > 0
    assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "checkpoints").exists()


def test_every_rank_gets_the_same_number_of_sequences(make_run, prepared_data, capsys):
    run_yaml = make_run()
    manifest = json.loads((prepared_data / "manifest.json").read_text())
    for world in (1, 3, 4):
        assert main(["launch", str(run_yaml), "--num-gpus", str(world), "--dry-run"]) == 0
        assignment = json.loads((run_yaml.parent / "out" / "assignment.json").read_text())
        per_rank = assignment["splits"]["validation"]["sequences_per_rank"]
        assert len(per_rank) == world and len(set(per_rank)) == 1
        assert per_rank[0] * world >= manifest["splits"]["validation"]["sequences"]
        assert assignment["splits"]["train"]["sequences_per_rank_per_step"] * world == \
            assignment["splits"]["train"]["global_batch_size"]
    capsys.readouterr()


def test_global_batch_adapts_to_the_ranks_or_fails_before_anything_is_written(make_run, capsys):
    run_yaml = make_run(train={"global_batch_size": 16})
    assert main(["launch", str(run_yaml), "--num-gpus", "2", "--dry-run"]) == 0
    assert "batch: micro 2 x accumulation 4 x 2 ranks" in capsys.readouterr().out
    ds_config = json.loads((run_yaml.parent / "out" / "ds_config.json").read_text())
    assert ds_config["gradient_accumulation_steps"] == 4 and ds_config["train_batch_size"] == 16
    shutil.rmtree(run_yaml.parent / "out")
    assert main(["launch", str(run_yaml), "--num-gpus", "3", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "train.global_batch_size 16 cannot be split over 3 data-parallel ranks (16 / 3 = 5.33333" in err
    assert not (run_yaml.parent / "out").exists()


def test_missing_data_is_one_clear_error(make_run, tmp_path, capsys):
    run_yaml = make_run(data={"output_dir": str(tmp_path / "never-prepared")})
    assert main(["launch", str(run_yaml), "--num-gpus", "1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert "manifest.json not found" in err and "zerotune prep" in err and len(err.splitlines()) == 1


def test_unresolvable_host_in_hostfile_fails_before_start(make_run, tmp_path, capsys):
    run_yaml = make_run()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\nzerotune-missing-node.invalid slots=1\n")
    assert main(["launch", str(run_yaml), "--hostfile", str(hostfile), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "zerotune-missing-node.invalid does not resolve" in err and str(hostfile) in err
    assert not (run_yaml.parent / "out").exists()


def test_stage_data_copies_and_verifies(prepared_data, tmp_path):
    from data_prep.format import load_manifest

    manifest = load_manifest(prepared_data)
    local = Cluster([Host("localhost", 2)], "local")
    dest = stage_data(prepared_data, tmp_path / "staged", local, manifest)
    assert (dest / "manifest.json").is_file()
    assert sorted(p.relative_to(dest) for p in dest.rglob("*.npy")) == \
        sorted(p.relative_to(prepared_data) for p in prepared_data.rglob("*.npy"))


def test_stage_data_detects_a_corrupt_copy(prepared_data, tmp_path, monkeypatch):
    import shutil as shutil_mod

    from data_prep.format import ManifestError, load_manifest

    real_copy = shutil_mod.copy2

    def corrupting_copy(src, dst):
        real_copy(src, dst)
        if str(src).endswith("shard-00000.labels.npy"):
            with open(dst, "r+b") as fh:
                fh.seek(-1, 2)
                fh.write(b"\x7f")

    monkeypatch.setattr("launcher.launch.shutil.copy2", corrupting_copy)
    with pytest.raises(ManifestError, match="does not match its checksum"):
        stage_data(prepared_data, tmp_path / "staged", Cluster([Host("localhost", 1)], "local"),
                   load_manifest(prepared_data))


def test_stage_data_refuses_remote_hostfile_hosts(prepared_data, tmp_path):
    cluster = Cluster([Host("localhost", 1), Host("10.255.255.1", 1)], "hostfile")
    with pytest.raises(LaunchError, match="remote hosts"):
        stage_data(prepared_data, tmp_path / "staged", cluster, {})


def test_stage_data_option_points_the_run_at_the_copy(make_run, tmp_path, capsys, monkeypatch):
    import launcher.launch_cli as cli_mod

    run_yaml = make_run()
    monkeypatch.setattr(cli_mod, "run_ranks", lambda argv, **kw: 0)  # everything but starting the ranks
    assert main(["launch", str(run_yaml), "--num-gpus", "1", "--stage-data", str(tmp_path / "local")]) == 0
    saved = yaml.safe_load((run_yaml.parent / "out" / "config.yaml").read_text())
    assert saved["data"]["output_dir"] == str(tmp_path / "local")
    assert "verified against the manifest" in capsys.readouterr().out


def test_auto_stage_is_resolved_before_the_run_dir_is_written(make_run, capsys):
    run_yaml = make_run(deepspeed={"config": "zero3.json", "zero_stage": "auto", "timeout_minutes": 2})
    assert main(["launch", str(run_yaml), "--num-gpus", "2", "--dry-run", "--gpu-memory-gb", "80"]) == 0
    out = capsys.readouterr().out
    assert "deepspeed.zero_stage auto -> ZeRO-0 is the fastest stage that fits" in out
    run_dir = run_yaml.parent / "out"
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["deepspeed"]["zero_stage"] == 0
    assert json.loads((run_dir / "ds_config.json").read_text())["zero_optimization"]["stage"] == 0


def test_auto_stage_that_fits_nowhere_stops_the_launch(make_run, capsys):
    run_yaml = make_run(deepspeed={"config": "zero3.json", "zero_stage": "auto", "timeout_minutes": 2})
    code = main(["launch", str(run_yaml), "--num-gpus", "2", "--dry-run", "--gpu-memory-gb", "0.01",
                 "--cpu-memory-gb", "0.01"])
    err = capsys.readouterr().err
    assert code == 2 and "fits nowhere" in err and "GB per GPU > 0.01 GB" in err
    assert not (run_yaml.parent / "out").exists()


def test_dry_run_prints_the_step_arithmetic(make_run, prepared_data, capsys):
    run_yaml = make_run(train={"max_steps": None, "epochs": 3, "micro_batch_size": 2,
                               "gradient_accumulation_steps": 2})
    assert main(["launch", str(run_yaml), "--num-gpus", "3", "--dry-run"]) == 0
    sequences = json.loads((prepared_data / "manifest.json").read_text())["splits"]["train"]["sequences"]
    per_epoch = sequences // 12
    assert (f"steps: {sequences} training sequences / 12 per optimizer step = {per_epoch} steps per epoch; "
            f"{3 * per_epoch} steps in total") in capsys.readouterr().out


def test_missing_launcher_tools_are_named():
    from launcher.cluster import ClusterError
    from launcher.launch import check_launcher_tools

    multi = Cluster([Host("n1", 8), Host("n2", 8)], "hostfile", master_addr="n1")
    with pytest.raises(ClusterError, match="pdsh not found"):
        check_launcher_tools(multi, which=lambda name: None if name == "pdsh" else f"/usr/bin/{name}")
    check_launcher_tools(Cluster([Host("localhost", 2)], "local"), which=lambda name: f"/usr/bin/{name}")
    with pytest.raises(ClusterError, match="srun not found"):
        check_launcher_tools(Cluster([Host("n1", 1)], "slurm"), which=lambda name: None)


def test_remote_env_passes_nccl_gloo_hf_and_nothing_else():
    from launcher.launch import remote_env

    env = {"NCCL_SOCKET_IFNAME": "eth0", "GLOO_SOCKET_IFNAME": "eth0", "HF_HOME": "/data/hf", "HOME": "/root",
           "PATH": "/usr/bin", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "DS_ACCELERATOR": "cpu",
           "HF_DATASETS_CACHE": "a\nb", "HF_TOKEN": "hf_secret", "SECRET": "x"}
    assert remote_env(env) == {"DS_ACCELERATOR": "cpu", "GLOO_SOCKET_IFNAME": "eth0", "HF_HOME": "/data/hf",
                               "NCCL_SOCKET_IFNAME": "eth0", "TORCH_NCCL_TRACE_BUFFER_SIZE": "2000"}


def test_multi_host_run_dir_holds_deepspeed_env_and_launch_sh_points_at_it(make_run, monkeypatch):
    from launcher.launch import write_run_dir
    from training.config import load_config

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth7")
    cfg = load_config(make_run())
    two = Cluster([Host("n1", 1), Host("n2", 1)], "hostfile", master_addr="n1")
    files = write_run_dir(cfg, two, None, train_args=["--no-preflight"])
    assert files.env_file == (files.run_dir / ".deepspeed_env").resolve()
    assert "GLOO_SOCKET_IFNAME=eth7\n" in files.env_file.read_text()
    assert f"export DS_ENV_FILE={files.env_file}\n" in files.launch_sh.read_text()
    assert files.argv[-1] == "--no-preflight" and files.argv[:2] == ["deepspeed", "--hostfile"]
    one = write_run_dir(cfg, Cluster([Host("localhost", 2)], "local"), None)
    assert one.env_file is None and "DS_ENV_FILE" not in one.launch_sh.read_text()


def test_rank_pattern_matches_this_runs_ranks_only():
    import re

    from launcher.launch import rank_pattern

    pattern = re.compile(rank_pattern("/runs/a-1/config.yaml"))
    rank = "/venv/bin/python -u /repo/training/train.py --local_rank=3 --config /runs/a-1/config.yaml"
    per_host_launcher = ("/venv/bin/python -u -m deepspeed.launcher.launch --world_info=x --node_rank=0 "
                         "--master_addr=n1 --master_port=1 /repo/training/train.py --config /runs/a-1/config.yaml")
    assert pattern.search(rank)
    assert not pattern.search(per_host_launcher)
    assert not pattern.search(rank.replace("a-1", "a-2"))


def test_a_failed_host_is_read_from_pdsh_but_a_preempted_one_is_not():
    from launcher.launch import failed_host

    assert failed_host("pdsh@node-a: node-b: ssh exited with exit code 2\n") == "node-b"
    assert failed_host("pdsh@node-a: node-b: ssh exited with exit code 247\n") == "node-b"
    assert failed_host("pdsh@node-a: node-b: ssh exited with exit code 85\n") is None
    assert failed_host("node-b: step 3 | loss 1.0 ssh exited with exit code 2\n") is None
