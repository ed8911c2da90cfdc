"""Training side of zerotune: resolved config -> DeepSpeed engine -> loop -> checkpoints, TensorBoard, export."""

# Exit code of a run stopped by SIGUSR1/SIGTERM after saving a checkpoint: "preempted, checkpoint saved".
# Defined here (no heavy imports) so the launcher can read it cheaply; training/preemption.py uses it.
PREEMPTED_EXIT_CODE = 85


def remove_allreduce_buffers(port, master_addr="*", local_rank="*") -> None:
    """Unlink the /dev/shm buffers of DeepSpeed's CPU all-reduce for a run on ``port``, which DeepSpeed
    never removes.

    Each run leaves ~69 MB per rank in the memory-backed /dev/shm, named by uid, master address, port and
    local rank; a machine running many short jobs on fresh ports fills its RAM. Other processes that still
    have a buffer mapped keep their mapping: unlinking only removes the name. ``master_addr`` and
    ``local_rank`` narrow the match (a rank removes its own); by default every rank's buffer goes.
    """
    import os
    from pathlib import Path

    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{port}_{local_rank}"):
        path.unlink(missing_ok=True)
