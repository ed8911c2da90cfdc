"""`zerotune export`: real ZeRO-2 and ZeRO-3 checkpoints from 2 gloo ranks, consolidated and verified.

The checkpoints are written by ``export_checkpoint_writer.py`` through the real ``deepspeed`` launcher
(once per stage per module), laid out as the training driver lays them out.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from launcher.cli import main as zerotune
from training.export import ExportError, export_checkpoint

REPO_ROOT = Path(__file__).resolve().parents[2]
WRITER = Path(__file__).with_name("export_checkpoint_writer.py")


def require(condition: bool, what: str) -> None:
    """tests/conftest.py's require, loaded by path: the name `conftest` is ambiguous across tests/."""
    spec = importlib.util.spec_from_file_location("zerotune_root_conftest", REPO_ROOT / "tests" / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.require(condition, what)


def _free_port() -> int:
    # Other dist tests may run at the same time: a fixed rendezvous port would collide.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_run(model_dir: Path, run_dir: Path, stage: int, precision: str) -> Path:
    require(shutil.which("deepspeed") is not None, "the deepspeed launcher")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(_free_port()), str(WRITER),
           "--model-dir", str(model_dir), "--run-dir", str(run_dir), "--stage", str(stage),
           "--precision", precision]
    proc = subprocess.run(cmd, cwd=run_dir.parent, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"checkpoint writer failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return run_dir


@pytest.fixture(scope="module")
def zero0_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A ZeRO-0 (plain data-parallel) fp32 run: weights come from the module states."""
    return _write_run(tiny_model_dir, tmp_path_factory.mktemp("zero0") / "run", stage=0, precision="fp32")


@pytest.fixture(scope="module")
def zero1_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A ZeRO-1 bf16 run: fp32 master weights partitioned in the optimizer states."""
    return _write_run(tiny_model_dir, tmp_path_factory.mktemp("zero1") / "run", stage=1, precision="bf16")


@pytest.fixture(scope="module")
def zero2_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A ZeRO-2 fp32 run with checkpoints step-2 (best) and step-4 (latest)."""
    return _write_run(tiny_model_dir, tmp_path_factory.mktemp("zero2") / "run", stage=2, precision="fp32")


@pytest.fixture(scope="module")
def zero3_run(tiny_model_dir, tmp_path_factory) -> Path:
    """A ZeRO-3 bf16 run (model built partitioned by training.model.load_model)."""
    return _write_run(tiny_model_dir, tmp_path_factory.mktemp("zero3") / "run", stage=3, precision="bf16")


@pytest.fixture()
def zero2_copy(zero2_run, tmp_path) -> Path:
    """A private copy of the ZeRO-2 run, for tests that damage it."""
    dst = tmp_path / "run"
    shutil.copytree(zero2_run, dst)
    return dst


def _saved_dtypes(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as fh:
        return {str(fh.get_tensor(k).dtype) for k in fh.keys()}


def _reference_error(model, run_dir: Path) -> float:
    reference = load_file(str(run_dir / "reference.safetensors"))
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits.float()
    return float((logits - reference["logits"]).abs().max() / reference["logits"].abs().max())


@pytest.mark.dist
@pytest.mark.parametrize("run_name, stage, dtype", [
    ("zero0_run", 0, torch.float32), ("zero1_run", 1, torch.bfloat16),
    ("zero2_run", 2, torch.float32), ("zero3_run", 3, torch.bfloat16)])
def test_export_round_trip(request, run_name, stage, dtype, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = request.getfixturevalue(run_name)
    out = tmp_path / "hf"
    assert zerotune(["export", str(run_dir), "--out", str(out)]) == 0
    assert f"exported checkpoint step-00000004 (ZeRO stage {stage})" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == dtype and _saved_dtypes(out) == {str(dtype)}
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tie lost"
    assert _reference_error(model, run_dir) < 1e-6, "exported weights are not the trained ones"
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is overfitting?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] > prompt["input_ids"].shape[1]
    assert not list(tmp_path.glob(".hf.tmp-*")), "temporary folder left behind"


@pytest.mark.dist
def test_zero3_model_was_built_partitioned(zero3_run):
    info = json.loads((zero3_run / "load_info.json").read_text())
    assert info["zero3_params"] == info["params"] > 0
    assert info["local_numel"] == 0, "a rank materialised whole parameters under ZeRO-3"
    assert info["dtype"] == "torch.bfloat16"


@pytest.mark.dist
def test_best_tag_and_dtype_override(zero2_run, tmp_path):
    best = export_checkpoint(zero2_run, tmp_path / "best", tag="best", dtype="bf16")
    latest = export_checkpoint(zero2_run, tmp_path / "latest")
    assert (best.tag, latest.tag) == ("step-00000002", "step-00000004")
    assert (best.zero_stage, latest.zero_stage) == (None, 2), "best must come from the weights-only save"
    assert _saved_dtypes(tmp_path / "best") == {"torch.bfloat16"}
    assert _saved_dtypes(tmp_path / "latest") == {"torch.float32"}
    a = load_file(str(tmp_path / "best" / "model.safetensors"))
    b = load_file(str(tmp_path / "latest" / "model.safetensors"))
    assert any(not torch.equal(a[k].float(), b[k].float().to(torch.bfloat16).float()) for k in a)


@pytest.mark.dist
@pytest.mark.parametrize("run_name", ["zero0_run", "zero1_run", "zero2_run", "zero3_run"])
def test_best_weights_loaded_back_give_the_best_logits(request, run_name):
    """The step-2 best weights, loaded into the engine after step 4 (no optimizer state), give exactly the
    probe logits the engine gave at step 2: same ranks, same kernels, same weights."""
    run_dir = request.getfixturevalue(run_name)
    ckpts = run_dir / "checkpoints"
    at_best = load_file(str(ckpts / "best-weights" / "step-00000002" / "probe.safetensors"))["logits"]
    at_end = load_file(str(ckpts / "step-00000004" / "probe.safetensors"))["logits"]
    reloaded = load_file(str(run_dir / "best_reloaded_probe.safetensors"))["logits"]
    assert not torch.allclose(at_end, at_best), "training did not move the weights: the test would prove nothing"
    assert torch.equal(reloaded, at_best)


@pytest.mark.dist
def test_best_weights_are_weights_only_in_the_training_precision(zero3_run, tmp_path, capsys):
    ckpts = zero3_run / "checkpoints"
    best = ckpts / "best-weights" / "step-00000002"
    assert (ckpts / "best").read_text().strip() == "step-00000002"
    assert sorted(p.name for p in best.iterdir()) == ["COMPLETE", "best.json", "model.safetensors",
                                                     "probe.safetensors"]
    weights = load_file(str(best / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    params = sum(t.numel() for t in weights.values())
    assert (best / "model.safetensors").stat().st_size < 2 * params + 8192
    full = sum(p.stat().st_size for p in (ckpts / "step-00000002").iterdir())
    assert full > 6 * (best / "model.safetensors").stat().st_size, "the full checkpoint is the heavy one"
    assert zerotune(["export", str(zero3_run), "--tag", "best", "--out", str(tmp_path / "hf")]) == 0
    assert "exported checkpoint step-00000002 (best weights)" in capsys.readouterr().out
    exported = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert exported.keys() == weights.keys() and all(torch.equal(exported[k], weights[k]) for k in weights)


@pytest.mark.dist
def test_incomplete_checkpoint_refused(zero2_copy, tmp_path, capsys):
    (zero2_copy / "checkpoints" / "step-00000004" / "COMPLETE").unlink()
    with pytest.raises(ExportError, match=r"step-00000004 is incomplete .*complete ones: step-00000002"):
        export_checkpoint(zero2_copy, tmp_path / "out", tag="step-00000004")
    assert zerotune(["export", str(zero2_copy), "--tag", "latest", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "incomplete" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
    # With no tag, the newest complete checkpoint is exported instead.
    fallback = export_checkpoint(zero2_copy, tmp_path / "out")
    assert fallback.tag == "step-00000002"
    assert any("skipping incomplete checkpoint(s) step-00000004" in note for note in fallback.notes)


@pytest.mark.dist
def test_corrupt_weights_refused_by_probe(zero2_copy, tmp_path):
    """Rank 1's shard reversed: same count, same norms, wrong weights. Only the probe can tell."""
    shard = zero2_copy / "checkpoints" / "step-00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(shard, map_location="cpu", weights_only=False)
    groups = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    groups[0] = groups[0].detach().flip(0).clone()
    torch.save(states, shard)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a previous export")
    with pytest.raises(ExportError, match="probe batch differ"):
        export_checkpoint(zero2_copy, out)
    assert (out / "keep.txt").is_file(), "a failed export must leave the destination alone"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")] == []


@pytest.mark.dist
def test_small_corruption_in_a_zero3_bf16_shard_refused(zero3_run, tmp_path):
    """A few hundred master weights off by 5%: within bf16 rounding across devices, but the probe was
    computed on this kind of device in this precision, so the tight tolerance applies and catches it."""
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    shard = run / "checkpoints" / "step-00000004" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(shard, map_location="cpu", weights_only=False)
    flat = states["optimizer_state_dict"]["fp32_flat_groups"]
    damaged = flat[0].detach().clone()
    damaged[:300] *= 1.05
    flat[0] = damaged
    torch.save(states, shard)
    with pytest.raises(ExportError, match="probe batch differ"):
        export_checkpoint(run, tmp_path / "out")


def _in_memory_export(run_dir: Path, out: Path) -> None:
    """The export as it was before streaming, kept as the reference: DeepSpeed consolidates the whole fp32
    state dict, the base model is loaded and overwritten with it, and save_pretrained writes the folder."""
    from transformers import AutoModelForCausalLM

    from training.config import load_config
    from training.export import consolidated_state_dict, zero_stage
    from training.streamed_model import tied_aliases

    tag_dir = run_dir / "checkpoints" / "step-00000004"
    state = consolidated_state_dict(tag_dir, zero_stage(tag_dir))
    base = load_config(run_dir / "config.yaml", validate=False).model.name_or_path
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    aliases = tied_aliases(model)
    result = model.load_state_dict({k: v for k, v in state.items() if k not in aliases}, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= set(aliases)
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)


@pytest.mark.dist
@pytest.mark.parametrize("run_name", ["zero0_run", "zero1_run", "zero2_run", "zero3_run"])
def test_streamed_export_equals_in_memory_export_bit_for_bit(request, run_name, tmp_path):
    """fp32 output: the streamed reader and writer must give exactly DeepSpeed's consolidated masters
    (stages 1-3) or module states (stage 0), under the same names, with the same config."""
    run_dir = request.getfixturevalue(run_name)
    export_checkpoint(run_dir, tmp_path / "streamed", dtype="fp32")
    _in_memory_export(run_dir, tmp_path / "reference")
    streamed = load_file(str(tmp_path / "streamed" / "model.safetensors"))
    reference = load_file(str(tmp_path / "reference" / "model.safetensors"))
    assert streamed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert streamed[name].dtype == tensor.dtype == torch.float32, name
        assert torch.equal(streamed[name], tensor), f"{name} differs from the in-memory export"
    config = json.loads((tmp_path / "streamed" / "config.json").read_text())
    assert config == json.loads((tmp_path / "reference" / "config.json").read_text())


@pytest.mark.dist
def test_shard_size_limit_writes_an_index_transformers_loads(zero3_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from training.shard_writer import INDEX_FILE

    export_checkpoint(zero3_run, tmp_path / "one")
    assert zerotune(["export", str(zero3_run), "--out", str(tmp_path / "sharded"), "--max-shard-size", "40KB"]) == 0
    sharded = tmp_path / "sharded"
    index = json.loads((sharded / INDEX_FILE).read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) >= 3 and sorted(set(index["weight_map"].values())) == files
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    for file in files:  # a tensor larger than the limit gets a file of its own, as in transformers
        held = [one[n].numel() * one[n].element_size() for n, f in index["weight_map"].items() if f == file]
        assert len(held) == 1 or sum(held) <= 40_000, f"{file} holds {held}: over the limit"
    assert index["weight_map"].keys() == one.keys()
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in one.values())
    model = AutoModelForCausalLM.from_pretrained(sharded)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), "tie lost"
    loaded = model.state_dict()
    assert all(torch.equal(loaded[name], tensor) for name, tensor in one.items())
    assert _reference_error(model, zero3_run) < 1e-6


@pytest.mark.dist
def test_truncated_partition_refused_naming_the_file(zero3_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero3_run, run)
    shard = run / "checkpoints" / "step-00000004" / "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ExportError, match=r"bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt: cannot read"):
        export_checkpoint(run, tmp_path / "out")
    assert zerotune(["export", str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "damaged or incomplete" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


@pytest.mark.dist
def test_partition_of_the_wrong_size_refused(zero2_copy, tmp_path):
    shard = zero2_copy / "checkpoints" / "step-00000004" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(shard, map_location="cpu", weights_only=False)
    groups = states["optimizer_state_dict"]["single_partition_of_fp32_groups"]
    groups[0] = groups[0].detach()[:-8].clone()
    torch.save(states, shard)
    with pytest.raises(ExportError, match=r"zero_pp_rank_1_mp_rank_00_optim_states.pt: holds partitions of"):
        export_checkpoint(zero2_copy, tmp_path / "out")


def test_probe_tolerance_depends_on_where_the_probe_was_computed(tmp_path):
    from safetensors.torch import save_file

    from training.export import PROBE_TOLERANCE, SAME_DEVICE_TOLERANCE, probe_tolerance

    tensors = {"input_ids": torch.zeros(1, 2, dtype=torch.int64), "logits": torch.zeros(1, 2, 3)}
    save_file(tensors, str(tmp_path / "gpu.safetensors"), metadata={"device_type": "cuda", "dtype": "bfloat16"})
    save_file(tensors, str(tmp_path / "cpu.safetensors"), metadata={"device_type": "cpu", "dtype": "bfloat16"})
    assert probe_tolerance(tmp_path / "gpu.safetensors", "bf16", "bf16") == PROBE_TOLERANCE["bf16"]
    assert probe_tolerance(tmp_path / "gpu.safetensors", "fp32", "bf16") == PROBE_TOLERANCE["bf16"]
    assert probe_tolerance(tmp_path / "cpu.safetensors", "bf16", "bf16") == SAME_DEVICE_TOLERANCE
    assert probe_tolerance(tmp_path / "cpu.safetensors", "bf16", "fp32") == PROBE_TOLERANCE["bf16"]
    with pytest.raises(ExportError, match="no probe"):
        probe_tolerance(tmp_path / "missing.safetensors", "bf16", "bf16")


def test_not_a_run_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ExportError, match="not a run directory"):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_cli_registers_export():
    proc = subprocess.run([sys.executable, "-m", "launcher.cli", "export", "--help"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--dtype" in proc.stdout and "run_dir" in proc.stdout


def _set_data_keys(run_dir: Path, **keys) -> None:
    import yaml

    path = run_dir / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg.setdefault("data", {}).update(keys)
    path.write_text(yaml.safe_dump(cfg))


def test_export_carries_the_chat_template_the_data_was_rendered_with(zero2_copy, tmp_path, capsys):
    """A run whose data used data.chat_template must export a tokenizer that formats prompts the same way;
    the base model's own template (here a different one) would prompt the model in a format it never saw."""
    from transformers import AutoTokenizer

    from data_prep.template import BUILTIN_DIR

    conversation = [{"role": "user", "content": "What is a p-value?"}]
    _set_data_keys(zero2_copy, template="chat", chat_template="llama3", system_prompt="Be brief.")
    assert zerotune(["export", str(zero2_copy), "--out", str(tmp_path / "hf")]) == 0
    exported = AutoTokenizer.from_pretrained(tmp_path / "hf")
    base = AutoTokenizer.from_pretrained(_model_path(zero2_copy))
    trained_format = base.apply_chat_template(conversation, chat_template=(BUILTIN_DIR / "llama3.jinja").read_text(),
                                              tokenize=False, add_generation_prompt=True)
    assert exported.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) == trained_format
    assert base.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True) != trained_format
    printed = capsys.readouterr().out
    assert "data.chat_template llama3" in printed and "data.system_prompt" in printed


def test_export_refuses_a_chat_template_file_it_cannot_find(zero2_copy, tmp_path):
    _set_data_keys(zero2_copy, template="chat", chat_template=str(tmp_path / "gone.jinja"))
    with pytest.raises(ExportError, match="gone.jinja.*exported tokenizer must carry it"):
        export_checkpoint(zero2_copy, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def _model_path(run_dir: Path) -> str:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["name_or_path"]
