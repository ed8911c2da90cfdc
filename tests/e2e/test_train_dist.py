"""training/train.py on 2 gloo ranks through the real `deepspeed` launcher, tiny random-init Llama, fp32.

Launches are the expensive part (~20 s each), so one 12-step reference run per ZeRO stage is shared by the
stage-matching, resume, run-dir and TensorBoard tests.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from training import remove_allreduce_buffers

REPO_ROOT = Path(__file__).resolve().parents[2]
SAMPLE_CSV = REPO_ROOT / "examples" / "data" / "data_science_questions.csv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
pytestmark = pytest.mark.dist

STEPS, HALF = 12, 6
LAUNCH_TIMEOUT_S = 600  # generous: other jobs may share the 2 cores


@pytest.fixture(scope="module")
def deepspeed_bin() -> str:
    path = shutil.which("deepspeed") or str(Path(sys.executable).parent / "deepspeed")
    if not Path(path).is_file():
        if IN_CI:  # CI must have every component: fail rather than skip
            pytest.fail("the deepspeed launcher is required in CI but missing", pytrace=False)
        pytest.skip("the deepspeed launcher is not installed")
    return path


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory) -> Path:
    from data_prep.pipeline import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(_data_section(out), tokenizer_path=str(tiny_model_dir))
    return out


def _data_section(out: Path):
    from data_prep.config import DataConfig

    return DataConfig(sources=[str(SAMPLE_CSV)], output_dir=str(out), record_type="prompt_response",
                      prompt_column="question", response_column="answer", seq_len=256, packing=True,
                      validation_fraction=0.1, test_fraction=0.1, num_shards=2)


def run_config(model_dir: Path, data_dir: Path, output_dir: Path, stage: int, **sections) -> dict:
    """A run config as a mapping: 12 steps, eval and checkpoint every 6; ``sections`` update it."""
    data = {k: v for k, v in vars(_data_section(data_dir)).items()}
    cfg = {
        "output_dir": str(output_dir),
        "model": {"name_or_path": str(model_dir)},
        "data": data,
        "train": {"loop": "sft", "max_steps": STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                  "precision": "fp32", "lr": 3.0e-3, "warmup_steps": 2, "seed": 7},
        "eval": {"every_steps": HALF, "max_batches": 2, "sample_generations": 1, "max_new_tokens": 4},
        "deepspeed": {"config": "zero2.json", "zero_stage": stage, "timeout_minutes": 3},
        "checkpoint": {"every_steps": HALF, "keep_last": 5},
    }
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    return cfg


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(extra_pythonpath: list[str] = (), **extra) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *extra_pythonpath, env.get("PYTHONPATH", "")])
    return env


def run_two_rank_script(deepspeed_bin: str, script: Path, *args: str) -> subprocess.CompletedProcess:
    """Run ``script`` on 2 ranks through the real launcher; asserts it succeeded and removes its shared
    memory buffers."""
    from training import remove_allreduce_buffers

    port = _free_port()
    argv = [deepspeed_bin, "--num_gpus", "2", "--master_port", str(port), str(script), *args]
    try:
        proc = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    finally:
        remove_allreduce_buffers(port)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def launch(deepspeed_bin: str, cfg: dict, extra_pythonpath=(), wait=True, ranks: int = 2, **env_extra):
    """Write ``cfg`` beside its output_dir and start it on ``ranks`` ranks; returns the finished process (or
    Popen)."""
    out = Path(cfg["output_dir"])
    config_path = out.parent / f"{out.name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    port = _free_port()
    argv = [deepspeed_bin, "--num_gpus", str(ranks), "--master_port", str(port),
            str(REPO_ROOT / "training" / "train.py"), "--config", str(config_path)]
    env = _env(list(extra_pythonpath), **env_extra)
    if not wait:
        proc = subprocess.Popen(argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, start_new_session=True)
        proc.master_port = port
        return proc
    try:
        return subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                              timeout=LAUNCH_TIMEOUT_S)
    finally:
        remove_allreduce_buffers(port)


def check(proc, rc: int = 0):
    assert proc.returncode == rc, \
        f"exit {proc.returncode}, expected {rc}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


def train_losses(run_dir: Path, tag: str = "train/loss") -> dict[int, float]:
    """Per-step ``tag`` from metrics.jsonl; a step run twice (before a crash, after resume) keeps the last."""
    values = {}
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["kind"] == "train":
            values[record["step"]] = record[tag]
    return values


@pytest.fixture(scope="module")
def reference(deepspeed_bin, tiny_model_dir, prepared, tmp_path_factory):
    """``reference(stage)``: the run dir of a finished 12-step run at that ZeRO stage (each launched once)."""
    runs: dict[int, Path] = {}
    root = tmp_path_factory.mktemp("reference")

    def get(stage: int) -> Path:
        if stage not in runs:
            out = root / f"stage{stage}"
            check(launch(deepspeed_bin, run_config(tiny_model_dir, prepared, out, stage)))
            runs[stage] = out
        return runs[stage]
    return get


def _copy_until_half(src: Path, dst: Path, latest: str | None) -> Path:
    """A copy of a finished run as it was after step HALF: later checkpoints gone, ``latest`` as given."""
    shutil.copytree(src, dst)
    ckpts = dst / "checkpoints"
    for folder in ckpts.glob("step-*"):
        if int(folder.name.split("-")[1]) > HALF:
            shutil.rmtree(folder)
    for name in ("best", "latest"):
        (ckpts / name).unlink(missing_ok=True)
    if latest is not None:
        (ckpts / "latest").write_text(latest)
    (dst / "results.json").unlink()
    (dst / "metrics.jsonl").unlink()  # so every loss read afterwards comes from the resumed run
    return dst


# --------------------------------------------------------------------------- stages


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_zero_stage_trains_with_decreasing_loss(reference, stage):
    losses = train_losses(reference(stage))
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses[STEPS] < losses[1] - 0.1, losses
    assert sum(b < a for a, b in zip(list(losses.values()), list(losses.values())[1:])) >= STEPS - 3


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stages_match_stage0_per_step(reference, stage):
    base, other = train_losses(reference(0)), train_losses(reference(stage))
    for step in range(1, STEPS + 1):
        assert other[step] == pytest.approx(base[step], abs=1e-4), f"step {step}"


def test_run_dir_layout_and_results(reference):
    from training.config import config_from_dict

    run = reference(0)
    cfg = config_from_dict(yaml.safe_load((run / "config.yaml").read_text()))
    assert cfg.train.max_steps == STEPS
    ds = json.loads((run / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 2 * 2 * 2 and ds["zero_optimization"]["stage"] == 0
    ckpts = run / "checkpoints"
    final = ckpts / f"step-{STEPS:08d}"
    assert (ckpts / "latest").read_text().strip() == final.name
    for name in ("COMPLETE", "zerotune_state.json", "probe.safetensors", "rng-rank0.safetensors",
                 "rng-rank1.safetensors"):
        assert (final / name).is_file(), name
    state = json.loads((final / "zerotune_state.json").read_text())
    assert state["step"] == STEPS and state["world_size"] == 2 and state["config_hash"] == cfg.config_hash()
    results = json.loads((run / "results.json").read_text())
    assert results["steps"] == STEPS and results["best_tag"] == (ckpts / "best").read_text().strip()
    assert results["test_loss"] > 0 and results["test_perplexity"] > 1
    assert results["final_eval_loss"] < train_losses(run)[1]


def _moe_model(tiny_model_dir: Path, out: Path, kind: str) -> Path:
    """A tiny random mixture-of-experts model built from its config, with the tiny model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralConfig, Qwen2MoeConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, num_experts_per_tok=2)
    if kind == "mixtral":
        config = MixtralConfig(num_local_experts=4, **common)
    else:
        config = Qwen2MoeConfig(num_experts=4, moe_intermediate_size=48, shared_expert_intermediate_size=96,
                                **common)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_trains_under_zero3_and_exports(deepspeed_bin, tiny_model_dir, prepared, tmp_path, kind):
    """Routing sends each rank's tokens to different experts; with the MoE blocks as ZeRO-3 leaves both
    ranks gather the same parameters, train 10 steps, and the checkpoint exports and verifies."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launcher.cli import main as zerotune

    model = _moe_model(tiny_model_dir, tmp_path / kind, kind)
    out = tmp_path / "run"
    cfg = run_config(model, prepared, out, stage=3, train={"max_steps": 10, "warmup_steps": 2},
                     eval={"every_steps": 5, "sample_generations": 0}, checkpoint={"every_steps": None})
    check(launch(deepspeed_bin, cfg))
    losses = train_losses(out)
    assert sorted(losses) == list(range(1, 11)) and losses[10] < losses[1] - 0.1, losses
    assert zerotune(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(exported).__name__ == type(AutoModelForCausalLM.from_pretrained(model)).__name__
    written, loaded = load_file(str(tmp_path / "hf" / "model.safetensors")), exported.state_dict()
    assert written.keys() == loaded.keys(), "transformers did not take the expert tensors as written"
    assert all(torch.equal(written[name], loaded[name]) for name in written)


def test_tensorboard_holds_the_documented_tags(reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(reference(0) / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = set(acc.Tags()["scalars"])
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec",
                "train/supervised_tokens_per_sec", "train/step_time_sec", "train/data_wait_sec",
                "train/memory_gb", "train/skipped_steps", "eval/loss", "eval/perplexity", "test/loss",
                "test/perplexity"}
    assert expected <= scalars, expected - scalars
    assert "train/mfu" not in scalars  # GPU only
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, STEPS + 1))
    texts = set(acc.Tags()["tensors"])
    assert any(t.startswith("config") for t in texts) and any(t.startswith("samples") for t in texts), texts


def test_each_step_logged_once_and_before_its_eval(reference):
    """A step's loss is summed over ranks with the next step's counts; an eval or checkpoint at that step
    must still see the step's train record first, and the last step must not be lost."""
    run = reference(2)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    order = [(r["kind"], r["step"]) for r in records]
    assert [step for kind, step in order if kind == "train"] == list(range(1, STEPS + 1))
    for step in (HALF, STEPS):
        assert order.index(("train", step)) < order.index(("eval", step))


# --------------------------------------------------------------------------- resume


def _assert_second_half_identical(reference_run: Path, resumed_run: Path):
    ref, got = train_losses(reference_run), train_losses(resumed_run)
    assert min(got) == HALF + 1, "the run did not resume at the saved step"
    for step in range(HALF + 1, STEPS + 1):
        assert got[step] == ref[step], f"step {step}: {got[step]!r} != {ref[step]!r}"


def test_resume_is_exact_stage1(deepspeed_bin, reference, tmp_path):
    ref = reference(1)
    run = _copy_until_half(ref, tmp_path / "run", latest=f"step-{HALF:08d}")
    proc = check(launch(deepspeed_bin, {**yaml.safe_load((ref.parent / "stage1.yaml").read_text()),
                                        "output_dir": str(run)}))
    assert f"resumed from step-{HALF:08d}" in proc.stdout
    _assert_second_half_identical(ref, run)


def test_resume_with_corrupt_latest_stage2(deepspeed_bin, reference, tmp_path):
    ref = reference(2)
    run = _copy_until_half(ref, tmp_path / "run", latest="\x00not a tag")
    proc = check(launch(deepspeed_bin, {**yaml.safe_load((ref.parent / "stage2.yaml").read_text()),
                                        "output_dir": str(run)}))
    assert "does not name a complete checkpoint" in proc.stdout
    _assert_second_half_identical(ref, run)


def test_killed_during_save_then_resumes_from_previous_complete_stage3(deepspeed_bin, reference, tmp_path):
    from training.driver import FAULT_KILL_IN_SAVE_ENV

    ref = reference(3)
    run = _copy_until_half(ref, tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg = {**yaml.safe_load((ref.parent / "stage3.yaml").read_text()), "output_dir": str(run)}
    killed = launch(deepspeed_bin, cfg, **{FAULT_KILL_IN_SAVE_ENV: str(STEPS)})
    assert killed.returncode != 0, killed.stdout[-2000:]
    partial = run / "checkpoints" / f"step-{STEPS:08d}"
    assert partial.is_dir() and not (partial / "COMPLETE").exists()
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{HALF:08d}"
    _assert_second_half_identical(ref, run)  # the run up to the kill was a resume too
    (run / "metrics.jsonl").unlink()
    proc = check(launch(deepspeed_bin, cfg))
    assert "skipping incomplete checkpoint" in proc.stdout and f"resumed from step-{HALF:08d}" in proc.stdout
    _assert_second_half_identical(ref, run)
    assert (partial / "COMPLETE").is_file()


# Resume on another world size: same global batch (2 x 2 x 2 = 8), the data order is global and DeepSpeed's
# universal checkpoint re-partitions the optimizer state. Tolerance 1e-4 on fp32 losses of ~5-8: the ranks
# see the same sequences, only the order of the gradient and loss reductions differs (observed ~1e-6).
CROSS_WORLD_TOL = 1e-4


@pytest.fixture(scope="module")
def one_rank_reference(deepspeed_bin, tiny_model_dir, prepared, tmp_path_factory):
    """``one_rank_reference(stage)``: a finished 12-step run on ONE rank, global batch 8 (micro 2 x
    accumulation 4)."""
    runs: dict[int, Path] = {}
    root = tmp_path_factory.mktemp("reference-1rank")

    def get(stage: int) -> Path:
        if stage not in runs:
            out = root / f"stage{stage}"
            cfg = run_config(tiny_model_dir, prepared, out, stage, train={"global_batch_size": 8})
            check(launch(deepspeed_bin, cfg, ranks=1))
            runs[stage] = out
        return runs[stage]
    return get


def _resume_on(deepspeed_bin, saved_run: Path, tmp_path: Path, ranks: int, **train) -> tuple:
    """Copy ``saved_run`` as it was after step HALF and continue it on ``ranks`` ranks."""
    run = _copy_until_half(saved_run, tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg = yaml.safe_load((saved_run.parent / f"{saved_run.name}.yaml").read_text())
    cfg["output_dir"] = str(run)
    cfg["train"].update({"global_batch_size": 8, **train})
    return launch(deepspeed_bin, cfg, ranks=ranks), run


def _assert_second_half_close(reference_run: Path, resumed_run: Path):
    ref, got = train_losses(reference_run), train_losses(resumed_run)
    assert sorted(got) == list(range(HALF + 1, STEPS + 1)), "the run did not resume at the saved step"
    for step in got:
        assert got[step] == pytest.approx(ref[step], abs=CROSS_WORLD_TOL), f"step {step}: {got[step]} vs {ref[step]}"


@pytest.mark.parametrize("stage", [2, 3])
def test_one_rank_and_two_ranks_train_alike_with_the_same_global_batch(reference, one_rank_reference, stage):
    """The global data order: 1 rank x accumulation 4 and 2 ranks x accumulation 2 take the same sequences
    each step (with different micro-batch and rank layouts), so the whole loss curve matches."""
    one, two = train_losses(one_rank_reference(stage)), train_losses(reference(stage))
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert one[step] == pytest.approx(two[step], abs=CROSS_WORLD_TOL), step


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_resume_two_ranks_on_one(deepspeed_bin, reference, tmp_path, stage):
    proc, run = _resume_on(deepspeed_bin, reference(stage), tmp_path, ranks=1)
    check(proc)
    assert f"saved on 2 ranks, now 1: loaded its universal form step-{HALF:08d}-universal" in proc.stdout
    assert "global batch 8 = micro 2 x accumulation 4 x 1 ranks" in proc.stdout
    _assert_second_half_close(reference(stage), run)
    assert (run / "checkpoints" / f"step-{HALF:08d}-universal" / "COMPLETE").is_file()
    assert not (run / "checkpoints" / ".universal-staging").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_resume_one_rank_on_two(deepspeed_bin, one_rank_reference, tmp_path, stage):
    proc, run = _resume_on(deepspeed_bin, one_rank_reference(stage), tmp_path, ranks=2)
    check(proc)
    assert f"saved on 1 ranks, now 2: loaded its universal form step-{HALF:08d}-universal" in proc.stdout
    _assert_second_half_close(one_rank_reference(stage), run)


def test_resume_two_ranks_on_one_with_the_optimizer_offloaded(deepspeed_bin, tiny_model_dir, prepared, reference,
                                                              tmp_path):
    """ZeRO-3 with optimizer and parameters offloaded to the CPU (the shipped zero3_offload.json): saved on
    2 ranks, resumed on 1 through the universal form. Offloading moves where Adam steps, not what it
    computes, so both halves also match the ZeRO-3 run without offload."""
    saved = tmp_path / "offload"
    check(launch(deepspeed_bin, run_config(tiny_model_dir, prepared, saved, stage=3,
                                           deepspeed={"config": "zero3_offload.json"})))
    zero = json.loads((saved / "ds_config.json").read_text())["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    (tmp_path / "resumed").mkdir()
    proc, run = _resume_on(deepspeed_bin, saved, tmp_path / "resumed", ranks=1)
    check(proc)
    assert f"saved on 2 ranks, now 1: loaded its universal form step-{HALF:08d}-universal" in proc.stdout
    _assert_second_half_close(saved, run)
    _assert_second_half_close(reference(3), run)


def test_resume_two_ranks_on_three_where_the_global_batch_divides(deepspeed_bin, tiny_model_dir, prepared,
                                                                  tmp_path):
    """Global batch 12: micro 2 x accumulation 3 x 2 ranks, then micro 2 x accumulation 2 x 3 ranks (the
    12 steps also cross an epoch boundary: 7 global batches per epoch)."""
    straight = tmp_path / "straight"
    check(launch(deepspeed_bin, run_config(tiny_model_dir, prepared, straight, stage=2,
                                           train={"global_batch_size": 12})))
    (tmp_path / "resumed").mkdir()
    proc, run = _resume_on(deepspeed_bin, straight, tmp_path / "resumed", ranks=3, global_batch_size=12)
    check(proc)
    assert "saved on 2 ranks, now 3" in proc.stdout and "global batch 12 = micro 2 x accumulation 2 x 3 ranks" \
        in proc.stdout
    _assert_second_half_close(straight, run)


def test_resume_on_a_world_size_that_cannot_split_the_global_batch_is_refused(deepspeed_bin, reference, tmp_path):
    ref = reference(2)
    run = _copy_until_half(ref, tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg = {**yaml.safe_load((ref.parent / "stage2.yaml").read_text()), "output_dir": str(run)}
    cfg["train"]["global_batch_size"] = 8
    proc = launch(deepspeed_bin, cfg, ranks=3)
    assert proc.returncode != 0
    assert "train.global_batch_size 8 cannot be split over 3 data-parallel ranks (8 / 3 = 2.66667" in \
        proc.stdout + proc.stderr
    assert not (run / "metrics.jsonl").exists()  # refused before any process group or step


def test_resume_on_another_world_size_with_another_global_batch_is_refused(reference, tmp_path):
    ref = reference(2)
    run = _copy_until_half(ref, tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg_path = tmp_path / "one.yaml"
    cfg_path.write_text(yaml.safe_dump({**yaml.safe_load((ref.parent / "stage2.yaml").read_text()),
                                        "output_dir": str(run)}))
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(cfg_path)], cwd=REPO_ROOT,
                          env=_env(MASTER_PORT=str(_free_port())), capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert ("saved on 2 data-parallel ranks with global batch 8, but this run has 1 ranks x micro 2 x "
            "accumulation 2 = 4; set train.global_batch_size: 8") in proc.stderr


def test_resume_with_another_param_group_layout_is_refused(deepspeed_bin, reference, tmp_path):
    """Weight decay 0 trains one optimizer parameter group; ZeRO's saved state for it cannot become the two
    groups weight decay needs, so the resume stops with what to do."""
    run = _copy_until_half(reference(1), tmp_path / "run", latest=f"step-{HALF:08d}")
    cfg = yaml.safe_load((reference(1).parent / "stage1.yaml").read_text())
    cfg["output_dir"] = str(run)
    cfg["train"]["weight_decay"] = 0.1
    proc = launch(deepspeed_bin, cfg)
    assert proc.returncode != 0
    assert ("holds optimizer state for 1 parameter group (saved with train.weight_decay 0.0) but "
            "train.weight_decay 0.1 needs 2") in proc.stderr + proc.stdout
    assert train_losses(run) == {}  # refused before any step


def test_two_group_checkpoint_resumes_with_the_new_optimizer_settings(deepspeed_bin, tiny_model_dir, prepared,
                                                                      tmp_path):
    """A run saved with weight decay (two groups) continues without it, and the new weight decay, betas
    and peak LR are the ones in effect after the resume (loading the optimizer state alone would bring
    back the saved ones)."""
    from training.engine import lr_multiplier

    loops_dir, record = tmp_path / "userpkg", tmp_path / "groups.jsonl"
    loops_dir.mkdir()
    (loops_dir / "rec_loops.py").write_text(
        "import json, os\nfrom training.loops import SFTLoop\n\n"
        "class Recording(SFTLoop):\n"
        "    def compute_loss(self, model, batch):\n"
        "        if os.environ['RANK'] == '0':\n"
        f"            with open({str(record)!r}, 'a') as fh:\n"
        "                fh.write(json.dumps({'step': model.lr_scheduler.last_epoch + 1, 'groups': [\n"
        "                    [g['weight_decay'], list(g['betas']), g['lr']] for g in model.optimizer.param_groups]}) + '\\n')\n"
        "        return super().compute_loss(model, batch)\n")
    out = tmp_path / "run"
    cfg = run_config(tiny_model_dir, prepared, out, stage=2,
                     train={"max_steps": 2, "weight_decay": 0.1, "loop": "rec_loops:Recording"},
                     eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
    check(launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)]))
    cfg["train"].update(max_steps=3, weight_decay=0.0, lr=1.0e-3, adam_beta2=0.99)
    proc = check(launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)]))
    assert "resumed from step-00000002" in proc.stdout
    assert sorted(train_losses(out)) == [1, 2, 3]
    seen = {r["step"]: r["groups"] for r in map(json.loads, record.read_text().splitlines())}
    assert [g[0] for g in seen[1]] == [0.1, 0.0]  # before: decay, and none for biases and norms
    lr_3 = 1.0e-3 * lr_multiplier(2, 3, cfg["train"]["warmup_steps"], "cosine", 0.1)
    assert seen[3] == [[0.0, [0.9, 0.99], pytest.approx(lr_3)]] * 2, seen[3]


# --------------------------------------------------------------------------- accumulation, loops, stopping


def test_accumulation_4x1_equals_1x4(deepspeed_bin, tiny_model_dir, prepared, tmp_path):
    """Same parameters whichever way a step's sequences are split into micro-batches (pretrain loop, so
    micro-batches differ a lot in token counts: a per-micro-batch mean would not match)."""
    from safetensors.torch import load_file

    runs = {}
    for micro, accum in ((1, 4), (4, 1)):
        out = tmp_path / f"m{micro}a{accum}"
        # Weight decay > 0: two optimizer parameter groups (decay, and none for biases and norms).
        cfg = run_config(tiny_model_dir, prepared, out, stage=2,
                         train={"max_steps": 3, "micro_batch_size": micro, "gradient_accumulation_steps": accum,
                                "loop": "pretrain", "weight_decay": 0.1},
                         eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
        check(launch(deepspeed_bin, cfg))
        runs[(micro, accum)] = out
    a, b = (train_losses(runs[k]) for k in ((1, 4), (4, 1)))
    assert a.keys() == b.keys() == {1, 2, 3}
    for step in a:
        assert a[step] == pytest.approx(b[step], rel=1e-5)
    # Adam hides a uniform gradient scale in the parameters; the pre-clipping norm shows it (e.g. a stray
    # division by the accumulation steps).
    norm_a, norm_b = (train_losses(runs[k], "train/grad_norm") for k in ((1, 4), (4, 1)))
    for step in norm_a:
        assert norm_a[step] == pytest.approx(norm_b[step], rel=1e-4)
    probes = [load_file(str(r / "checkpoints" / "step-00000003" / "probe.safetensors")) for r in runs.values()]
    diff = (probes[0]["logits"] - probes[1]["logits"]).abs().max().item()
    assert diff < 1e-3, diff


def test_user_loop_by_import_path_and_early_stopping(deepspeed_bin, tiny_model_dir, prepared, tmp_path):
    loops_dir = tmp_path / "userpkg"
    loops_dir.mkdir()
    calls = tmp_path / "calls"
    calls.mkdir()
    (loops_dir / "my_loops.py").write_text(
        "import os\nfrom pathlib import Path\nfrom training.loops import SFTLoop\n\n"
        "class CountingLoop(SFTLoop):\n"
        "    def compute_loss(self, model, batch):\n"
        f"        Path({str(calls)!r}, f'rank{{os.environ[\"RANK\"]}}').touch()\n"
        "        return super().compute_loss(model, batch)\n")
    out = tmp_path / "run"
    # lr so small nothing improves by min_delta: the first eval sets the best, two more without gain stop it.
    cfg = run_config(tiny_model_dir, prepared, out, stage=1,
                     train={"loop": "my_loops:CountingLoop", "max_steps": 40, "lr": 1e-9, "warmup_steps": 0},
                     eval={"every_steps": 2, "early_stopping_patience": 2, "early_stopping_min_delta": 0.5,
                           "sample_generations": 0},
                     checkpoint={"every_steps": None})
    proc = check(launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)]))
    assert sorted(p.name for p in calls.iterdir()) == ["rank0", "rank1"]
    results = json.loads((out / "results.json").read_text())
    assert results["stopped_early"] is True and results["steps"] == 6, results
    assert results["best_tag"] == "step-00000002"
    assert "early stopping at step 6" in proc.stdout
    # The test split ran on the best evaluation's weights, which were saved weights-only: no full checkpoint.
    assert results["test_weights_tag"] == "step-00000002"
    ckpts = out / "checkpoints"
    assert (ckpts / "best-weights" / "step-00000002" / "COMPLETE").is_file()
    assert not (ckpts / "step-00000002").exists() and (ckpts / "best").read_text().strip() == "step-00000002"


def test_a_loop_that_miscounts_stops_every_rank_before_saving(deepspeed_bin, tiny_model_dir, prepared, tmp_path):
    """count_tokens off by one on rank 1 only: the summed check stops both ranks at the next boundary with
    the same one-line error (no rank left waiting in a collective), before the step-1 checkpoint."""
    loops_dir = tmp_path / "userpkg"
    loops_dir.mkdir()
    (loops_dir / "bad_loops.py").write_text(
        "import os\nfrom training.loops import SFTLoop\n\n"
        "class OffByOne(SFTLoop):\n"
        "    def count_tokens(self, batch):\n"
        "        return super().count_tokens(batch) + (os.environ['RANK'] == '1')\n")
    out = tmp_path / "run"
    cfg = run_config(tiny_model_dir, prepared, out, stage=2, train={"loop": "bad_loops:OffByOne", "max_steps": 4},
                     eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": 1})
    proc = launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)])
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    message = ("error: loop 'bad_loops:OffByOne': at step 1 compute_loss scored a different number of tokens "
               "than count_tokens said (off by 2 over all ranks)")
    assert text.count(message) == 2, text[-4000:]  # once per rank
    assert not list((out / "checkpoints").glob("step-*")), "a checkpoint was saved after the miscounted step"


def test_unknown_loop_name_is_one_line_before_any_process_group(tiny_model_dir, prepared, tmp_path):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(run_config(tiny_model_dir, prepared, tmp_path / "run", stage=0,
                                                  train={"loop": "sfft"})))
    proc = subprocess.run([sys.executable, "-m", "training.train", "--config", str(cfg_path)], cwd=REPO_ROOT,
                          env=_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "'sfft' is not a registered loop" in proc.stderr and "pretrain" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_truncated_shard_is_one_error_on_every_rank_before_any_collective(deepspeed_bin, tiny_model_dir,
                                                                         prepared, tmp_path):
    """`deepspeed training/train.py` (no launcher checksums) on a shard 100 bytes short: exit 2 on both ranks,
    each with one line naming the file and the fix, no memmap traceback and no dead-peer error."""
    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    shard = data / "train" / "shard-00001.input_ids.npy"
    os.truncate(shard, shard.stat().st_size - 100)
    cfg = run_config(tiny_model_dir, prepared, tmp_path / "run", stage=3)
    cfg["data"]["output_dir"] = str(data)
    proc = launch(deepspeed_bin, cfg)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 2, text[-4000:]
    assert text.count(f"error: {shard}: has ") == 2, text[-4000:]  # once per rank
    assert "zerotune prep CONFIG --force" in text
    assert "Traceback" not in text and "Connection closed by peer" not in text
    assert not (tmp_path / "run" / "checkpoints").exists()


# --------------------------------------------------------------------------- preemption


def _rank_pids(config_path: str) -> dict[int, int]:
    """pid of each training rank started with ``config_path`` (read from /proc)."""
    pids = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\x00")
        except OSError:
            continue
        if config_path in argv and any(a.startswith("--local_rank=") for a in argv):
            rank = int(next(a for a in argv if a.startswith("--local_rank=")).split("=")[1])
            pids[rank] = int(entry.name)
    return pids


def _signal_after_steps(proc, out: Path, logged_steps: int, send) -> str:
    """Once the run in ``out`` has logged ``logged_steps`` steps, call ``send`` with its ranks' pids; returns
    the launch's output when it has ended (killed if it outlives the timeout)."""
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT_S
        metrics = out / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text().count("\n") >= logged_steps):
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.2)
        send(_rank_pids(str(out.parent / "run.yaml")))
        stdout, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
        return stdout
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        remove_allreduce_buffers(proc.master_port)


def test_sigusr1_saves_and_exits_85(deepspeed_bin, tiny_model_dir, prepared, tmp_path):
    from training.preemption import PREEMPTED_EXIT_CODE

    out = tmp_path / "run"
    cfg = run_config(tiny_model_dir, prepared, out, stage=2, train={"max_steps": 5000},
                     eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
    proc = launch(deepspeed_bin, cfg, wait=False)

    def send(pids):
        assert set(pids) == {0, 1}, pids
        os.kill(pids[1], signal.SIGUSR1)  # one rank only: the ranks must agree at the step boundary
        time.sleep(0.05)
        os.kill(pids[1], signal.SIGUSR1)  # a second signal before or during the save changes nothing
        time.sleep(0.3)
        if proc.poll() is None and pids[0] in _rank_pids(str(out.parent / "run.yaml")).values():
            os.kill(pids[0], signal.SIGTERM)  # SIGTERM is handled the same way
    stdout = _signal_after_steps(proc, out, 2, send)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stdout[-3000:]
    tag = (out / "checkpoints" / "latest").read_text().strip()
    state = json.loads((out / "checkpoints" / tag / "zerotune_state.json").read_text())
    assert (out / "checkpoints" / tag / "COMPLETE").is_file()
    assert state["step"] == max(train_losses(out)) and 2 <= state["step"] < 5000
    assert not (out / "results.json").exists()


def test_preempted_run_resumes_exactly_when_the_loop_draws_random_numbers(deepspeed_bin, tiny_model_dir,
                                                                           prepared, tmp_path):
    """A loop's prepare_batch that draws random numbers (here: drop 30% of the supervised labels) runs
    before the step's all-reduce that carries the preemption flag; the saved RNG state must be the one from
    before it, so the resumed run draws what an uninterrupted run draws."""
    from training.preemption import PREEMPTED_EXIT_CODE

    loops_dir = tmp_path / "userpkg"
    loops_dir.mkdir()
    (loops_dir / "drop_loops.py").write_text(
        "import torch\nfrom training.loops import SFTLoop\n\n"
        "class LabelDrop(SFTLoop):\n"
        "    def prepare_batch(self, batch):\n"
        "        labels = batch['labels'].clone()\n"
        "        labels[torch.rand(labels.shape) < 0.3] = -100\n"
        "        return {**batch, 'labels': labels}\n")
    common = dict(eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
    train = {"loop": "drop_loops:LabelDrop", "lr_schedule": "constant", "warmup_steps": 0}
    out = tmp_path / "run"
    cfg = run_config(tiny_model_dir, prepared, out, stage=1, train={**train, "max_steps": 5000}, **common)
    proc = launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)], wait=False)
    stdout = _signal_after_steps(proc, out, 3, lambda pids: os.kill(pids[0], signal.SIGUSR1))
    assert proc.returncode == PREEMPTED_EXIT_CODE, stdout[-3000:]
    stopped = max(train_losses(out))
    cfg["train"]["max_steps"] = stopped + 2
    check(launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)]))
    straight = tmp_path / "straight"
    check(launch(deepspeed_bin, run_config(tiny_model_dir, prepared, straight, stage=1,
                                           train={**train, "max_steps": stopped + 2}, **common),
                 extra_pythonpath=[str(loops_dir)]))
    resumed, reference_losses = train_losses(out), train_losses(straight)
    for step in range(1, stopped + 3):
        assert resumed[step] == reference_losses[step], f"step {step} (preempted after {stopped})"


def test_sigusr1_during_a_long_evaluation_stops_within_one_batch_and_resumes_exactly(deepspeed_bin, tiny_model_dir,
                                                                                       prepared, tmp_path):
    """The ranks agree on the flag before every evaluation batch: a signal mid-evaluation saves the step
    and exits 85 after at most the batch in flight; the resumed run repeats that evaluation, and its train
    and eval losses equal an uninterrupted run's."""
    from training.preemption import PREEMPTED_EXIT_CODE

    loops_dir = tmp_path / "userpkg"
    loops_dir.mkdir()
    (loops_dir / "slow_eval.py").write_text(
        "import os, time, torch\nfrom training.loops import SFTLoop\n\n"
        "class SlowEval(SFTLoop):\n"
        "    def compute_loss(self, model, batch):\n"
        "        if not torch.is_grad_enabled():\n"
        "            with open(os.environ['EVAL_LOG'], 'a') as fh:\n"
        "                fh.write(f\"{os.environ['RANK']} {time.time()}\\n\")\n"
        "            time.sleep(float(os.environ['EVAL_SLEEP_S']))\n"
        "        return super().compute_loss(model, batch)\n")
    sections = dict(train={"max_steps": 4, "loop": "slow_eval:SlowEval"},
                    eval={"every_steps": 2, "max_batches": None, "micro_batch_size": 1, "sample_generations": 0},
                    checkpoint={"every_steps": None})
    out, log = tmp_path / "run", tmp_path / "eval.log"
    cfg = run_config(tiny_model_dir, prepared, out, stage=2, **sections)
    proc = launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)], wait=False, EVAL_LOG=str(log),
                  EVAL_SLEEP_S="1.0")
    sent = []

    def send(pids):
        while not (log.is_file() and log.read_text().count("\n") >= 2):  # both ranks inside the evaluation
            assert proc.poll() is None, "the run ended before its evaluation"
            time.sleep(0.1)
        sent.append(time.time())
        os.kill(pids[1], signal.SIGUSR1)
    stdout = _signal_after_steps(proc, out, 2, send)
    assert proc.returncode == PREEMPTED_EXIT_CODE, stdout[-3000:]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    starts = [line.split() for line in log.read_text().splitlines()]
    for rank in ("0", "1"):
        after = [t for r, t in starts if r == rank and float(t) > sent[0]]
        assert len(after) <= 1, f"rank {rank} began {len(after)} evaluation batches after the signal"
    validation = json.loads((prepared / "manifest.json").read_text())["splits"]["validation"]["sequences"]
    assert len(starts) < 2 * -(-validation // 2), "the evaluation was not cut short"

    check(launch(deepspeed_bin, cfg, extra_pythonpath=[str(loops_dir)], EVAL_LOG=str(log), EVAL_SLEEP_S="0"))
    straight = tmp_path / "straight"
    check(launch(deepspeed_bin, run_config(tiny_model_dir, prepared, straight, stage=2, **sections),
                 extra_pythonpath=[str(loops_dir)], EVAL_LOG=str(tmp_path / "straight.log"), EVAL_SLEEP_S="0"))
    assert train_losses(out) == train_losses(straight)
    evals = [{r["step"]: r["eval/loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
              if r["kind"] == "eval"} for d in (out, straight)]
    assert evals[0] == evals[1] and sorted(evals[0]) == [2, 4]
