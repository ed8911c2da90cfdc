import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from training.tiny_model import write_tiny_model


def test_tiny_model_loads_with_auto_classes_and_generates(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert model.config.model_type == "llama"
    assert (tiny_model_dir / "model.safetensors").is_file()
    n_params = sum(p.numel() for p in model.parameters())
    assert n_params < 5_000_000
    assert tok.is_fast and tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id is not None and tok.bos_token_id is not None
    assert model.config.vocab_size == len(tok)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is a p-value?"}],
                                     add_generation_prompt=True, return_dict=False)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > len(prompt)


def test_tokenizer_round_trips_and_chat_template_is_prefix_stable(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "Standardise features: z = (x - mean) / std, e.g. for SVMs & k-NN."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    user = [{"role": "user", "content": "Define recall."}]
    full = user + [{"role": "assistant", "content": "TP / (TP + FN)."}]
    prefix = tok.apply_chat_template(user, add_generation_prompt=True, return_dict=False)
    whole = tok.apply_chat_template(full, return_dict=False)
    assert whole[: len(prefix)] == prefix
    assert tok.eos_token_id in whole[len(prefix):]


def test_same_seed_gives_same_weights(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("alpha beta gamma delta\n" * 50, encoding="utf-8")
    a = write_tiny_model(tmp_path / "a", [str(corpus)], vocab_size=300, hidden_size=32, seed=3)
    b = write_tiny_model(tmp_path / "b", [str(corpus)], vocab_size=300, hidden_size=32, seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    meta = json.loads((a / "zerotune_tiny.json").read_text())
    assert meta["seed"] == 3 and meta["params"] > 0
    assert not list(tmp_path.glob(".*tmp-*")), "temporary folder left behind"
