"""`zerotune status RUN_DIR`: every rank's last heartbeat, and which ranks are behind or silent.

A hung collective looks the same from every rank (no progress), so the heartbeats say where each rank
last got to: the ranks that are behind the others are the ones to look at; the others are usually
waiting for them in a collective (their stack dumps, ``RUN_DIR/heartbeats/rank-N.stacks``, show where).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from training.heartbeat import HEARTBEAT_DIR, PHASES, read_heartbeats, stacks_path

BEHIND_AFTER_S = 10.0  # a rank behind the front this long is flagged (a passing difference is not)
SILENT_AFTER_S = 120.0  # no heartbeat for this long: the rank is stuck or gone


class StatusError(RuntimeError):
    """A folder without heartbeats."""

    user_error = True


@dataclass
class RankStatus:
    """One rank's last heartbeat, and what is wrong with it."""

    beat: dict
    age_s: float
    behind: bool
    silent: bool

    @property
    def position(self) -> tuple:
        return _position(self.beat)


def _position(beat: dict) -> tuple:
    """Where a rank is in training, comparable across ranks: step, then micro-batch and phase within it."""
    phase = PHASES.index(beat["phase"]) if beat["phase"] in PHASES else 0
    micro = beat.get("micro", 0) if beat["phase"] in ("forward", "backward", "step") else 1 << 30
    return (beat["step"], micro if phase else -1, phase)


def rank_statuses(beats: list[dict], now: float, behind_after_s: float = BEHIND_AFTER_S,
                  silent_after_s: float = SILENT_AFTER_S) -> list[RankStatus]:
    """Flag each rank: behind (not as far as the furthest rank, for ``behind_after_s``) and silent."""
    front = max((_position(b) for b in beats), default=None)
    out = []
    for beat in beats:
        age = now - beat["time"]
        done = beat["phase"] == "exit"
        out.append(RankStatus(beat, age, behind=not done and _position(beat) < front and age >= behind_after_s,
                              silent=not done and age >= silent_after_s))
    return out


def format_status(run_dir: str | Path, statuses: list[RankStatus]) -> str:
    """A table of ranks, then one line per flagged rank."""
    lines = [f"{'rank':>5}  {'host':<20} {'pid':>8}  {'step':>7}  {'phase':<9} {'age':>8}  flags"]
    for s in statuses:
        b = s.beat
        flags = ", ".join(f for f, on in (("BEHIND", s.behind), ("SILENT", s.silent)) if on)
        lines.append(f"{b['rank']:>5}  {b['host']:<20} {b['pid']:>8}  {b['step']:>7}  {b['phase']:<9} "
                     f"{s.age_s:>7.0f}s  {flags}")
    world = statuses[0].beat.get("world_size", len(statuses)) if statuses else 0
    if len(statuses) < world:
        seen = {s.beat["rank"] for s in statuses}
        lines.append(f"missing: no heartbeat from rank(s) {sorted(set(range(world)) - seen)} (never started)")
    furthest = max(statuses, key=lambda s: s.position)
    for s in statuses:
        b = s.beat
        if s.behind:
            lines.append(f"behind: rank {b['rank']} on {b['host']} (pid {b['pid']}) has been in step {b['step']} "
                         f"{b['phase']} for {s.age_s:.0f}s while rank {furthest.beat['rank']} is at step "
                         f"{furthest.beat['step']} {furthest.beat['phase']}: the others are likely waiting for it")
        elif s.silent:
            lines.append(f"silent: rank {b['rank']} on {b['host']} (pid {b['pid']}): no heartbeat for "
                         f"{s.age_s:.0f}s, last in step {b['step']} {b['phase']}")
    if any(s.behind or s.silent for s in statuses):
        lines.append(f"stacks: send SIGUSR2 to a rank (on its host: pkill -USR2 -f {Path(run_dir) / 'config.yaml'}) "
                     f"and read {stacks_path(run_dir, 0).parent}/rank-N.stacks")
    return "\n".join(lines)


def status(run_dir: str | Path, now: float | None = None) -> tuple[str, bool]:
    """The report for ``run_dir`` and whether any rank is flagged."""
    beats = read_heartbeats(run_dir)
    if not beats:
        raise StatusError(f"{Path(run_dir) / HEARTBEAT_DIR}: no heartbeats; is {run_dir} the output_dir of a run "
                          f"that has started?")
    statuses = rank_statuses(beats, time.time() if now is None else now)
    return format_status(run_dir, statuses), any(s.behind or s.silent for s in statuses)


def cmd_status(args) -> int:
    """Print the report; exit 1 when a rank is behind or silent, 0 otherwise."""
    report, flagged = status(args.run_dir)
    print(report)
    return 1 if flagged else 0


def register(subparsers, add_config_args) -> None:
    """Add the `status` subcommand."""
    p = subparsers.add_parser("status", help="show each rank's last heartbeat; flag ranks behind or silent",
                              description="Read RUN_DIR/heartbeats (one file per rank: host, pid, step, phase, "
                                          "time) and flag ranks that are behind the others or silent. Exit code "
                                          "1 when a rank is flagged.")
    p.add_argument("run_dir", help="the run's output_dir")
    p.set_defaults(func=cmd_status)
