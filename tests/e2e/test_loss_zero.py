"""The chunked loss under ZeRO-0 and ZeRO-3 on 2 gloo ranks: the same loss and gradients as the plain loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.e2e.test_train_dist import deepspeed_bin, run_two_rank_script  # noqa: F401

pytestmark = pytest.mark.dist
WRITER = Path(__file__).resolve().parents[1] / "training" / "loss_zero_writer.py"


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).norm() / want.norm())


def test_chunked_loss_equals_plain_under_zero0_and_zero3(deepspeed_bin, tiny_model_dir, tmp_path):  # noqa: F811
    """fp32, 1e-6 relative per tensor (sums in another order; see tests/training/test_loss.py)."""
    out = tmp_path / "steps.pt"
    run_two_rank_script(deepspeed_bin, WRITER, "--model-dir", str(tiny_model_dir), "--out", str(out))
    results = torch.load(out)
    for stage in (0, 3):
        before, plain_after, plain_loss = results[f"stage{stage}-chunk0"]
        _, chunked_after, chunked_loss = results[f"stage{stage}-chunk5"]
        assert abs(chunked_loss - plain_loss) <= 1e-6 * abs(plain_loss), stage
        for name, weight in before.items():
            plain_grad, chunked_grad = weight - plain_after[name], weight - chunked_after[name]
            assert plain_grad.norm() > 0, name
            assert _relative(chunked_grad, plain_grad) <= 1e-6, (stage, name)
    # And ZeRO-3 trains like ZeRO-0 (the chunked head's gradient reaches ZeRO-3's reduce-scatter).
    z0, z3 = results["stage0-chunk5"], results["stage3-chunk5"]
    assert abs(z3[2] - z0[2]) <= 1e-6 * abs(z0[2])
    for name, weight in z0[0].items():
        assert _relative(z3[0][name] - z3[1][name], weight - z0[1][name]) <= 1e-5, name
