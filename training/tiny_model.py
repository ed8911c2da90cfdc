"""A tiny Llama-architecture model and a byte-level BPE tokenizer, built offline.

The demo and the tests need a model folder that `transformers` loads exactly like a hub model, without
reaching any hub: random weights in the Llama layout plus a tokenizer trained on the given text, with
special tokens and a ChatML-style chat template.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

BOS, EOS, PAD, IM_START = "<|begin_of_text|>", "<|im_end|>", "<|pad|>", "<|im_start|>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IM_START, "<|end_of_text|>"]

# ChatML-style: every turn is "<|im_start|>{role}\n{content}<|im_end|>\n". The assistant's turn ends with
# <|im_end|>, which is the EOS token, so a fine-tuned model learns to stop after answering.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _text_lines(paths: list[str]):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    yield line


def train_tokenizer(train_text_files: list[str], vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer (GPT-2 style pre-tokenization) and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    missing = [p for p in train_text_files if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"--train-text: {missing[0]} does not exist")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_text_lines(train_text_files), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096)


def write_tiny_model(out_dir: str | os.PathLike, train_text_files: list[str], vocab_size: int = 2048,
                     hidden_size: int = 128, num_layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny random-init LlamaForCausalLM (safetensors) and its tokenizer to ``out_dir``.

    The folder is written under a temporary name beside ``out_dir`` and renamed into place when complete.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tokenizer = train_tokenizer([str(p) for p in train_text_files], vocab_size=vocab_size)
    heads = max(1, hidden_size // 32)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2 + hidden_size // 2,
        num_hidden_layers=num_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, max_new_tokens=64, do_sample=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "zerotune_tiny.json").write_text(json.dumps(
        {"built_by": "zerotune tiny-model", "seed": seed, "vocab_size": len(tokenizer),
         "params": sum(p.numel() for p in model.parameters())}, indent=2))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
