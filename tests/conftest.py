"""Fixtures shared by every test tier: the tiny offline model, the bundled sample data, component checks."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SAMPLE_CSV = REPO_ROOT / "examples" / "data" / "data_science_questions.csv"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# A small corpus used when the bundled sample is absent, so the tokenizer still sees varied text.
_FALLBACK_TEXT = [
    "What is overfitting? Overfitting is when a model learns noise in the training data.",
    "How does gradient descent work? It moves parameters against the gradient of the loss.",
    "Explain precision and recall. Precision is TP / (TP + FP); recall is TP / (TP + FN).",
    "What does a pandas merge do? It joins two DataFrames on key columns, like a SQL join.",
    "Why standardise features? Many models assume features on comparable scales.",
]


def require(condition: bool, what: str) -> None:
    """Skip a test whose component is missing locally, but fail in CI, where everything must be installed."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"{what} is required in CI but missing", pytrace=False)
    pytest.skip(f"{what} not available")


@pytest.fixture(scope="session")
def sample_csv() -> Path:
    """The bundled data-science question/answer CSV."""
    assert SAMPLE_CSV.is_file(), f"bundled sample data missing: {SAMPLE_CSV}"
    return SAMPLE_CSV


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random-init Llama + BPE tokenizer, built once per test session (read-only for tests)."""
    from training.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("tiny-model")
    text_files = []
    if SAMPLE_CSV.is_file():
        text_files.append(str(SAMPLE_CSV))
    else:
        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(_FALLBACK_TEXT * 20), encoding="utf-8")
        text_files.append(str(corpus))
    return write_tiny_model(root / "model", text_files, vocab_size=1024, hidden_size=64, num_layers=2, seed=0)


@pytest.fixture()
def tiny_model_copy(tiny_model_dir, tmp_path) -> Path:
    """A private copy of the tiny model folder, for tests that modify it."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


_SHM = Path("/dev/shm")
_DS_SHM_GLOB = "deepspeed_allreduce_buffer_*"


@pytest.fixture(scope="session", autouse=True)
def _remove_leaked_shared_memory():
    """Ranks the tests kill (SIGKILL, preemption, hang diagnosis) never unlink DeepSpeed's CPU all-reduce
    buffers in /dev/shm; a full run would leave hundreds of MB there. Remove the ones this session made."""
    before = set(_SHM.glob(_DS_SHM_GLOB)) if _SHM.is_dir() else set()
    yield
    if _SHM.is_dir():
        for path in set(_SHM.glob(_DS_SHM_GLOB)) - before:
            path.unlink(missing_ok=True)
