"""train.py's checks before any process group: tokenizer against manifest, arguments."""

from __future__ import annotations

import pytest

from data_prep.format import tokenizer_hash
from training.data import DataError
from training.train import check_tokenizer, parse_args


def test_tokenizer_mismatch_is_refused_with_the_fix(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    good = {"tokenizer": {"vocab_size": len(tok), "hash": tokenizer_hash(tok)}}
    check_tokenizer(good, tok, "prepared", str(tiny_model_dir))
    bad_size = {"tokenizer": {"vocab_size": len(tok) + 1, "hash": tokenizer_hash(tok)}}
    with pytest.raises(DataError, match="vocab_size") as exc:
        check_tokenizer(bad_size, tok, "prepared", str(tiny_model_dir))
    assert "zerotune prep" in str(exc.value) and "manifest.json" in str(exc.value)
    with pytest.raises(DataError, match="hash"):
        check_tokenizer({"tokenizer": {"vocab_size": len(tok), "hash": "0" * 64}}, tok, "prepared", "m")


def test_parse_args_accepts_the_launchers_local_rank():
    args = parse_args(["--config", "run.yaml", "--set", "train.lr=1e-5", "--local_rank=1"])
    assert args.local_rank == 1 and args.overrides == ["train.lr=1e-5"] and args.config == "run.yaml"


def test_resume_never_refuses_a_run_dir_with_checkpoints(tmp_path):
    from training.checkpoint import ResumeError
    from training.config import RunConfig
    from training.train import check_resume_setting

    cfg = RunConfig(output_dir=str(tmp_path))
    cfg.checkpoint.resume = "never"
    check_resume_setting(cfg)  # empty run dir: fine
    folder = tmp_path / "checkpoints" / "step-00000004"
    folder.mkdir(parents=True)
    (folder / "zerotune_state.json").write_text("{}")
    (folder / "COMPLETE").touch()
    with pytest.raises(ResumeError, match="step-00000004"):
        check_resume_setting(cfg)
    cfg.checkpoint.resume = "auto"
    check_resume_setting(cfg)
