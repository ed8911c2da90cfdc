"""Ask an exported model one question through its chat template: `python examples/ask.py MODEL_DIR "question"`.

Loads the folder with plain `transformers` (no zerotune code), which is the point: an export must work
anywhere a Hugging Face model does.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model_dir")
    parser.add_argument("question")
    parser.add_argument("--max-new-tokens", type=int, default=60)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir)
    model.eval()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.question}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=args.max_new_tokens, do_sample=False, no_repeat_ngram_size=3)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    print(f"Q: {args.question}\nA: {answer}")


if __name__ == "__main__":
    main()
