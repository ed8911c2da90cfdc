"""`zerotune prep CONFIG` through the real CLI entry point."""

import yaml

from launcher.cli import main


def _config(tmp_path, model, source, **data):
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"name_or_path": str(model)},
           "data": {"sources": [str(source)], "output_dir": str(tmp_path / "prepared"), "seq_len": 256,
                    "prompt_column": "question", "response_column": "answer", **data}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_prep_then_up_to_date(tiny_model_dir, qa_csv, tmp_path, capsys):
    config = _config(tmp_path, tiny_model_dir, qa_csv)
    assert main(["prep", config]) == 0
    out = capsys.readouterr().out
    assert "split" in out and "supervised" in out and "dropped by reason" in out
    assert main(["prep", config]) == 0
    assert "up to date" in capsys.readouterr().out
    assert main(["prep", config, "--force"]) == 0
    assert "up to date" not in capsys.readouterr().out
    assert main(["prep", config, "--set", "data.packing=false"]) == 0
    assert "packing off" in capsys.readouterr().out


def test_bad_data_is_one_line_and_exit_2(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n{oops\n')
    assert main(["prep", _config(tmp_path, tiny_model_dir, bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("zerotune prep: error: ") and "bad.jsonl: line 2: invalid JSON" in err[-1]
    assert "Traceback" not in "\n".join(err)
