"""`zerotune launch`: check everything, write the run dir, then start the ranks; the job's exit code is theirs.

Order matters: config, data and cluster are all checked before anything starts, so a mistake fails in
seconds on the login node. The pure pieces (argv, assignment summary) are unit-tested without a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from launcher.cluster import Cluster, build_hostfile
from launcher.slurm import RANK_EXIT_GRACE_S
from training import PREEMPTED_EXIT_CODE
from training.steps import data_parallel_size

REPO_ROOT = Path(__file__).resolve().parent.parent
TRAIN_SCRIPT = REPO_ROOT / "training" / "train.py"
# Signals a scheduler sends before it stops a job, and Ctrl-C; forwarded to the ranks (SIGINT as SIGTERM),
# which checkpoint and exit 85.
FORWARDED_SIGNALS = {signal.SIGUSR1: signal.SIGUSR1, signal.SIGTERM: signal.SIGTERM, signal.SIGINT: signal.SIGTERM}
# Variables the ranks on other hosts need from the launching shell. DeepSpeed's pdsh runner passes on only
# a few prefixes of its own (PYTHON*, UCX*, ...), plus what its .deepspeed_env file lists: we write that file.
REMOTE_ENV_PREFIXES = ("NCCL_", "GLOO_", "HF_", "TORCH_NCCL_", "TORCH_DISTRIBUTED_", "ZEROTUNE_")
REMOTE_ENV_NAMES = ("DS_ACCELERATOR", "OMP_NUM_THREADS")
DEEPSPEED_ENV_FILE = ".deepspeed_env"
# pdsh's report of a host whose command ended: "pdsh@node-a: node-b: ssh exited with exit code 2".
PDSH_EXIT_LINE = re.compile(r"pdsh@[^:]+: ([^:\s]+): ssh exited with exit code (\d+)")


class LaunchError(RuntimeError):
    """A run that cannot start (missing data, a run dir that is not writable, staging failed)."""

    user_error = True


@dataclass
class RunFiles:
    """Paths written into the run dir."""

    run_dir: Path
    config: Path
    command: Path
    launch_sh: Path
    assignment: Path | None = None
    hostfile: Path | None = None
    ds_config: Path | None = None
    env_file: Path | None = None  # .deepspeed_env: variables for the ranks on other hosts
    argv: list[str] = dataclasses.field(default_factory=list)


# --------------------------------------------------------------------------- pure: argv


def deepspeed_argv(cluster: Cluster, config_path: str | Path, train_script: str | Path = TRAIN_SCRIPT,
                   hostfile_path: str | Path | None = None) -> list[str]:
    """The `deepspeed` launcher command for a local or hostfile cluster."""
    head = ["deepspeed"]
    if cluster.source == "local":
        head += ["--num_gpus", str(cluster.world_size)]
    else:
        if hostfile_path is None:
            raise ValueError("a hostfile cluster needs hostfile_path")
        head += ["--hostfile", str(hostfile_path), "--master_addr", cluster.master_addr]
        if cluster.num_nodes == 1 and cluster.master_addr == "127.0.0.1":
            # One local host: deepspeed would still insist on ssh to it; we checked the host ourselves.
            head.append("--no_ssh_check")
    head += ["--master_port", str(cluster.master_port)]
    return head + [str(train_script), "--config", str(config_path)]


def srun_argv(cluster: Cluster, config_path: str | Path, train_script: str | Path = TRAIN_SCRIPT,
              python: str = "python") -> list[str]:
    """One srun task per GPU; each maps SLURM_PROCID etc. to RANK/WORLD_SIZE/LOCAL_RANK and runs the driver."""
    per_node = cluster.hosts[0].slots
    # Same exit policy as slurm/train.sbatch: peers of the first rank to end get a grace period.
    return ["srun", f"--nodes={cluster.num_nodes}", f"--ntasks-per-node={per_node}",
            f"--ntasks={cluster.world_size}", "--kill-on-bad-exit=0", f"--wait={RANK_EXIT_GRACE_S}", python,
            "-m", "launcher.slurm_exec", str(train_script), "--config", str(config_path)]


def launch_argv(cluster: Cluster, config_path: str | Path, hostfile_path: str | Path | None = None,
                train_script: str | Path = TRAIN_SCRIPT, train_args: list[str] = ()) -> list[str]:
    """srun inside a SLURM allocation, the deepspeed launcher otherwise; ``train_args`` go to train.py."""
    if cluster.source == "slurm":
        return srun_argv(cluster, config_path, train_script, python=sys.executable) + list(train_args)
    return deepspeed_argv(cluster, config_path, train_script, hostfile_path) + list(train_args)


def remote_env(env: dict) -> dict[str, str]:
    """The variables of ``env`` that ranks on other hosts need (REMOTE_ENV_PREFIXES, REMOTE_ENV_NAMES).

    Left out: values spanning lines (DeepSpeed's file format is one KEY=VALUE per line) and secrets
    (HF_TOKEN...: the file lies in the run dir; give each host its own token file instead)."""
    return {k: v for k, v in sorted(env.items())
            if (k.startswith(REMOTE_ENV_PREFIXES) or k in REMOTE_ENV_NAMES) and "\n" not in v and "TOKEN" not in k}


def is_multi_host(cluster: Cluster) -> bool:
    """Ranks on several hosts, started over ssh by DeepSpeed's pdsh runner."""
    return cluster.source == "hostfile" and cluster.num_nodes > 1


def check_launcher_tools(cluster: Cluster, which=shutil.which) -> None:
    """The programs this cluster's launch needs are installed here (before anything starts)."""
    from launcher.cluster import ClusterError

    needed = ["srun"] if cluster.source == "slurm" else ["deepspeed"]
    if cluster.source == "hostfile" and cluster.num_nodes > 1:
        needed.append("pdsh")  # deepspeed's multi-node launcher starts the remote ranks through pdsh
    missing = [n for n in needed if not which(n) and not (Path(sys.executable).parent / n).is_file()]
    if missing:
        raise ClusterError(f"{', '.join(missing)} not found on this machine, but a {cluster.source} launch with "
                           f"{cluster.num_nodes} node(s) needs it; install it or put it on PATH")


# --------------------------------------------------------------------------- ZeRO stage "auto"


def detected_memory_gb(ranks_per_node: int) -> tuple[float, float]:
    """(memory per rank, RAM per node) of this machine: the GPU's memory, or on CPU a share of RAM."""
    import psutil
    import torch

    ram_gb = psutil.virtual_memory().total / 1024**3
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / 1024**3, ram_gb
    return ram_gb / max(1, ranks_per_node), ram_gb


def resolve_auto_stage(cfg, cluster: Cluster, gpu_memory_gb: float | None = None,
                       cpu_memory_gb: float | None = None) -> str | None:
    """With ``deepspeed.zero_stage: auto``, set the fastest stage that fits (via `zerotune plan`); the reason."""
    if cfg.deepspeed.zero_stage != "auto":
        return None
    from launcher.plan import make_plan

    per_node = cluster.hosts[0].slots
    detected_gpu, detected_cpu = detected_memory_gb(per_node)
    plan = make_plan(cfg, num_nodes=cluster.num_nodes, gpus_per_node=per_node,
                     gpu_memory_gb=gpu_memory_gb or detected_gpu, cpu_memory_gb=cpu_memory_gb or detected_cpu)
    if plan.chosen is None:
        raise LaunchError(f"deepspeed.zero_stage auto: {plan.reason}")
    cfg.deepspeed.zero_stage = plan.chosen["stage"]
    if plan.chosen["offload"]:
        cfg.deepspeed.config = "zero3_offload.json"
    return f"deepspeed.zero_stage auto -> {plan.reason}"


# --------------------------------------------------------------------------- data: check, assign, stage


def check_data(data_dir: str | Path) -> dict:
    """The prepared data's manifest, after verifying every shard's checksum."""
    from data_prep.format import load_manifest, verify_shards

    manifest = load_manifest(data_dir)
    verify_shards(data_dir, manifest)
    return manifest


def assignment_summary(manifest: dict, world_size: int, global_batch_size: int) -> dict:
    """What each data-parallel rank (``world_size`` of them; a sequence-parallel group reads as one) reads. Training: the global order (training.data), each step's ``global_batch_size``
    sequences dealt across the ranks; evaluation splits: per rank, the (shard, start, stop) ranges of
    training.data.assign_sequences."""
    from training.data import assign_sequences

    out = {"world_size": world_size, "splits": {}}
    for split in manifest["splits"]:
        if split == "train":
            out["splits"][split] = {
                "order": "global: per epoch one permutation of all sequences from (train.seed, epoch); each "
                         "step's sequences dealt across ranks by supervised tokens",
                "global_batch_size": global_batch_size, "sequences_per_rank_per_step": global_batch_size // world_size}
            continue
        ranks = assign_sequences(manifest, split, world_size)
        out["splits"][split] = {
            "sequences_per_rank": [sum(stop - start for _, start, stop in r) for r in ranks],
            "ranges": [_jsonable(r) for r in ranks]}
    return out


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def stage_data(data_dir: str | Path, dest: str | Path, cluster: Cluster, manifest: dict) -> Path:
    """Copy the shards to node-local ``dest`` (sbcast under SLURM) and verify them against the manifest."""
    src, dest = Path(data_dir), Path(dest)
    files = [p for p in sorted(src.rglob("*")) if p.is_file()]
    if cluster.source == "slurm":
        _stage_with_sbcast(src, dest, files)
        return dest
    if any(not _is_local(h.name) for h in cluster.hosts):
        raise LaunchError("--stage-data with remote hosts in a hostfile is not supported; stage the data "
                          "on each host yourself or run under SLURM (sbcast)")
    for path in files:
        target = dest / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    from data_prep.format import verify_shards

    verify_shards(dest, manifest)
    return dest


def _is_local(name: str) -> bool:
    from launcher.cluster import is_local_host

    return is_local_host(name)


def _stage_with_sbcast(src: Path, dest: Path, files: list[Path]) -> None:
    dirs = sorted({str(dest / p.parent.relative_to(src)) for p in files})
    _run_checked(["srun", "--ntasks-per-node=1", "mkdir", "-p", *dirs], "creating the staging folders")
    for path in files:
        _run_checked(["sbcast", "--force", str(path), str(dest / path.relative_to(src))], f"sbcast {path}")
    verify = f"from data_prep.format import verify_shards; verify_shards({str(dest)!r})"
    _run_checked(["srun", "--ntasks-per-node=1", sys.executable, "-c", verify],
                 "verifying the staged shards on every node")


def _run_checked(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise LaunchError(f"{what} failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")


# --------------------------------------------------------------------------- run dir


def write_run_dir(cfg, cluster: Cluster, manifest: dict | None, stage_dir: str | None = None,
                  train_args: list[str] = ()) -> RunFiles:
    """Write config.yaml, hostfile, assignment.json, ds_config.json (when computable), command and launch.sh,
    and for several hosts .deepspeed_env (the NCCL_*, GLOO_*, HF_*... variables of this shell)."""
    from training.config import save_config

    run_dir = Path(cfg.output_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LaunchError(f"output_dir {run_dir}: cannot create it ({exc.strerror})") from None
    files = RunFiles(run_dir=run_dir, config=run_dir / "config.yaml", command=run_dir / "command.txt",
                     launch_sh=run_dir / "launch.sh")
    if stage_dir:
        cfg.data.output_dir = str(stage_dir)
    save_config(cfg, files.config)
    if cluster.source != "local":
        files.hostfile = run_dir / "hostfile"
        files.hostfile.write_text(build_hostfile(cluster.hosts), encoding="utf-8")
    if manifest is not None:
        files.assignment = run_dir / "assignment.json"
        data_parallel = data_parallel_size(cluster.world_size, cfg.train.sequence_parallel_size)
        files.assignment.write_text(json.dumps(assignment_summary(
            manifest, data_parallel,
            cfg.train.micro_batch_size * cfg.train.gradient_accumulation_steps * data_parallel)), encoding="utf-8")
    files.ds_config = _write_ds_config(cfg, cluster.world_size, run_dir)
    export = ""
    if is_multi_host(cluster):
        files.env_file = (run_dir / DEEPSPEED_ENV_FILE).resolve()
        files.env_file.write_text("".join(f"{k}={v}\n" for k, v in remote_env(dict(os.environ)).items()),
                                  encoding="utf-8")
        export = f"export DS_ENV_FILE={shlex.quote(str(files.env_file))}\n"
    files.argv = launch_argv(cluster, files.config.resolve(), files.hostfile.resolve() if files.hostfile else None,
                             train_args=train_args)
    command = shlex.join(files.argv)
    files.command.write_text(command + "\n", encoding="utf-8")
    files.launch_sh.write_text("#!/usr/bin/env bash\n# Written by `zerotune launch`; rerun to restart "
                               "(training resumes from checkpoints/latest).\nset -euo pipefail\n"
                               f"cd {shlex.quote(str(REPO_ROOT))}\n{export}exec {command}\n", encoding="utf-8")
    files.launch_sh.chmod(0o755)
    return files


def _write_ds_config(cfg, world_size: int, run_dir: Path) -> Path:
    """The resolved DeepSpeed config, computed by the driver's own function (the driver writes the same)."""
    from training.engine import resolve_ds_config

    path = run_dir / "ds_config.json"
    resolved = resolve_ds_config(cfg.train, cfg.deepspeed, cfg.ds_config_path(), world_size)
    path.write_text(json.dumps(resolved, indent=2), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- run


def run_ranks(argv: list[str], cwd: str | Path = REPO_ROOT, cluster: Cluster | None = None,
              files: RunFiles | None = None) -> int:
    """Start the launcher, forward preemption signals to the ranks, and return the launcher's exit code.

    The launcher runs in its own session, so a terminal's Ctrl-C reaches only this process, which turns
    it into a checkpoint-and-stop on every rank (on several hosts: over ssh, see _signal_remote_ranks).
    On several hosts, a host whose ranks fail stops the ranks on every host (see _relay_and_watch).
    """
    argv = [_executable(argv[0]), *argv[1:]]
    env = dict(os.environ)
    multi = cluster is not None and files is not None and is_multi_host(cluster)
    if multi and files.env_file is not None:
        env["DS_ENV_FILE"] = str(files.env_file)  # an absolute name: DeepSpeed's runner reads it as is
    try:
        proc = subprocess.Popen(argv, cwd=str(cwd), env=env, start_new_session=True,
                                **({"stdout": subprocess.PIPE, "stderr": subprocess.STDOUT, "text": True,
                                    "errors": "replace"} if multi else {}))
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]} not found: install DeepSpeed in this environment (pip install deepspeed)"
                          f" or put it on PATH") from None

    def forward(signum, _frame):
        sent = FORWARDED_SIGNALS[signum]
        if multi:
            _signal_remote_ranks(cluster, files.config.resolve(), sent)
            return
        for pid in _rank_pids(proc.pid):
            try:
                os.kill(pid, sent)
            except ProcessLookupError:
                pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED_SIGNALS}
    try:
        if multi:
            _relay_and_watch(proc, cluster, files.config.resolve())
        return proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def failed_host(line: str) -> str | None:
    """The host named by pdsh's line for a host whose launcher failed (not a preempted, exit-85 stop)."""
    m = PDSH_EXIT_LINE.match(line)
    if m and int(m.group(2)) not in (0, PREEMPTED_EXIT_CODE):
        return m.group(1)
    return None


def _relay_and_watch(proc: subprocess.Popen, cluster: Cluster, config_path: Path) -> None:
    """Copy the runner's output through; at the first host that fails, kill the ranks on every host.

    pdsh waits for every host, and a rank whose peer died before the process group formed waits out its
    connect timeout (minutes); DeepSpeed's per-host launcher does this for one host, we do it across hosts.
    """
    stopped = False
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        host = failed_host(line)
        if host and not stopped:
            stopped = True
            print(f"zerotune launch: the ranks on {host} failed; stopping the ranks on every host", flush=True)
            _signal_remote_ranks(cluster, config_path, signal.SIGKILL)


def rank_pattern(config_path: str | Path, script_name: str = TRAIN_SCRIPT.name) -> str:
    """A `pkill -f` pattern for this run's ranks only: the training script with the --local_rank the
    deepspeed launcher gives each rank, then this run's config (the per-host launchers have no --local_rank)."""
    return f"{re.escape(script_name)} --local_rank=[0-9]+ --config {re.escape(str(config_path))}"


def _signal_remote_ranks(cluster: Cluster, config_path: Path, signum: int) -> None:
    """Send ``signum`` to this run's ranks on every host, over ssh (the ranks are children of sshd there,
    not of this process); one ssh per host, in parallel, not waited for past 30 s."""
    remote = f"pkill -{signal.Signals(signum).name[3:]} -f {shlex.quote(rank_pattern(config_path))}"
    procs = [subprocess.Popen(["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", host.name, remote],
                              stdin=subprocess.DEVNULL) for host in cluster.hosts]
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def _executable(name: str) -> str:
    """``name`` from PATH, else next to this Python (a virtual environment that is not activated)."""
    if shutil.which(name):
        return name
    sibling = Path(sys.executable).parent / name
    return str(sibling) if sibling.is_file() else name


def _rank_pids(launcher_pid: int, script_name: str = TRAIN_SCRIPT.name) -> list[int]:
    """The training processes under the launcher (srun forwards signals to its tasks by itself)."""
    import psutil

    try:
        root = psutil.Process(launcher_pid)
        if root.name() == "srun":
            return [launcher_pid]
        children = root.children(recursive=True)
    except psutil.Error:
        return []
    ranks = []
    for child in children:
        try:
            cmd = child.cmdline()
        except psutil.Error:
            continue
        # Only the ranks get the signal (the deepspeed launchers have no SIGUSR1 handler and would die):
        # a rank is the driver script started with the --local_rank the launcher appends.
        if any(a.endswith(script_name) for a in cmd) and any(a.startswith("--local_rank") for a in cmd):
            ranks.append(child.pid)
    return ranks
