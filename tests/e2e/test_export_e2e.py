"""The whole path on 2 gloo ranks: prepared data -> launch (ZeRO-3, every-k checkpointing) -> export -> generate."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.dist


def _require(condition: bool, what: str) -> None:
    # tests/conftest.py by path: the name `conftest` is ambiguous inside tests/e2e.
    spec = importlib.util.spec_from_file_location("zerotune_root_conftest", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.require(condition, what)


def _zerotune(*args: str, timeout_s: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launcher.cli", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout_s)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_trained_zero3_run_exports_and_generates(write_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require(shutil.which("deepspeed") is not None, "the deepspeed launcher")
    config = write_run(tmp_path, model={"gradient_checkpointing": "every_k", "checkpoint_every_k_layers": 2},
                       train={"max_steps": 4, "lr": 3.0e-3}, deepspeed={"config": "zero3.json"},
                       checkpoint={"every_steps": 2, "keep_last": 2})
    proc = _zerotune("launch", str(config), "--num-gpus", "2", "--master-port", str(_free_port()))
    assert proc.returncode == 0, f"zerotune launch failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    out = tmp_path / "hf"
    proc = _zerotune("export", str(tmp_path / "out"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exported checkpoint step-00000004 (ZeRO stage 3)" in proc.stdout

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    changed = [n for n, p in model.named_parameters() if not p.equal(base.get_parameter(n))]
    assert changed, "the exported weights are the untrained ones"
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is overfitting?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
    new_tokens = generated.shape[1] - prompt["input_ids"].shape[1]
    assert new_tokens == 4 or (new_tokens > 0 and generated[0, -1].item() == tokenizer.eos_token_id)
