"""Tokenizers reproducing the chat formats of Llama 3.x, Qwen 2.5, Mistral, Gemma and Phi-3 (for the tests).

Each is a byte-level BPE with a small vocabulary trained here, the family's special tokens, BOS/EOS, and
the family's published chat format as its chat template: the built-in template of that name with its
``{% generation %}`` markers removed (they emit nothing, so the rendering is the same), as the tokenizers
on the hub ship them. ``assistant_text`` is what each format writes for an assistant turn, up to and
including its end-of-turn token: exactly what must carry loss.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from data_prep.template import BUILTIN_DIR

CALL = {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}]


def _call_json(call: dict) -> str:
    return json.dumps(call, ensure_ascii=False)


FAMILIES = {
    "llama3": {"specials": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
               "bos": "<|begin_of_text|>", "eos": "<|eot_id|>",
               "answer": lambda c: c.strip() + "<|eot_id|>",
               "call": lambda c: json.dumps({"name": c["name"], "parameters": c["arguments"]}) + "<|eot_id|>"},
    "qwen2.5": {"specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "bos": None, "eos": "<|im_end|>",
                "answer": lambda c: c + "<|im_end|>",
                "call": lambda c: f'<tool_call>\n{{"name": "{c["name"]}", "arguments": '
                                  f'{json.dumps(c["arguments"])}}}\n</tool_call><|im_end|>'},
    "mistral": {"specials": ["<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                             "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
                "bos": "<s>", "eos": "</s>",
                "answer": lambda c: " " + c + "</s>",
                "call": lambda c: "[TOOL_CALLS] [" + _call_json(c) + "]</s>"},
    "gemma": {"specials": ["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], "bos": "<bos>",
              "eos": "<eos>", "answer": lambda c: c.strip() + "<end_of_turn>",
              "call": lambda c: "```tool_call\n" + _call_json(c) + "\n```<end_of_turn>"},
    "phi3": {"specials": ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
             "bos": "<s>", "eos": "<|endoftext|>", "answer": lambda c: c + "<|end|>",
             "call": lambda c: _call_json(c) + "<|end|>"},
}

_GENERATION_TAGS = re.compile(r"{%-?\s*(end)?generation\s*-?%}")


def published_template(name: str) -> str:
    """The family's chat format without {% generation %} markers (as the hub tokenizers have it)."""
    return _GENERATION_TAGS.sub("", (BUILTIN_DIR / f"{name}.jinja").read_text(encoding="utf-8"))


def _corpus() -> list[str]:
    words = ("the weather in Paris is sunny and warm today call a tool to get the city forecast user "
             "assistant system answer question what is how why 0123456789 {} [] : , \" \n").split(" ")
    return [" ".join(words[i:] + words[:i]) for i in range(len(words))] * 20


def family_tokenizer(name: str, out_dir: Path):
    """Train and save the family's tokenizer in ``out_dir``; returns the loaded tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    fam = FAMILIES[name]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=fam["specials"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=fam["bos"], eos_token=fam["eos"],
                                   chat_template=published_template(name))
    fast.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)
