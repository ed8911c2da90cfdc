"""bf16 training on 2 gloo ranks accumulates gradients in fp32 (as the engine reports) and tracks fp32."""

from __future__ import annotations

import re

import pytest

from tests.e2e.test_train_dist import check, deepspeed_bin, launch, prepared, run_config, train_losses  # noqa: F401

pytestmark = pytest.mark.dist
STEPS = 30


def test_bf16_accumulates_in_fp32_and_follows_the_fp32_loss_curve(deepspeed_bin, tiny_model_dir,  # noqa: F811
                                                                  prepared, tmp_path):  # noqa: F811
    """Every step's loss within 1% of the fp32 run's (bf16 rounds weights and activations, not the sums)."""
    curves = {}
    for precision in ("fp32", "bf16"):
        cfg = run_config(tiny_model_dir, prepared, tmp_path / precision, 2,
                         train={"max_steps": STEPS, "precision": precision, "gradient_accumulation_steps": 4,
                                "micro_batch_size": 1, "lr": 1e-3},
                         eval={"every_steps": None, "sample_generations": 0}, checkpoint={"every_steps": None})
        proc = check(launch(deepspeed_bin, cfg))
        reported = re.findall(r"gradients accumulate in (torch\.\w+)", proc.stdout)
        assert reported == ["torch.float32"], proc.stdout[-2000:]
        curves[precision] = train_losses(tmp_path / precision)
    assert sorted(curves["bf16"]) == sorted(curves["fp32"]) == list(range(1, STEPS + 1))
    worst = max(abs(curves["bf16"][s] - curves["fp32"][s]) / curves["fp32"][s] for s in curves["fp32"])
    assert worst <= 0.01, f"bf16 loss strays {worst:.2%} from fp32"
