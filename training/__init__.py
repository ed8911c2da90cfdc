"""Training side of zerotune: resolved config -> DeepSpeed engine -> loop -> checkpoints, TensorBoard, export."""

# Exit code of a run stopped by SIGUSR1/SIGTERM after saving a checkpoint: "preempted, checkpoint saved".
# Defined here (no heavy imports) so the launcher can read it cheaply; training/preemption.py uses it.
PREEMPTED_EXIT_CODE = 85
