#!/usr/bin/env bash
# The whole job on the embedded default (examples/demo.yaml): build the tiny local model, prepare the
# bundled data, train on 2 CPU ranks with DeepSpeed (evaluating on validation and, at the end, on the
# held-out test split), export a Hugging Face folder, and ask the exported model a question.
# Run from the repository root (`make demo` does). Safe to re-run: the model and prep are cached, and each
# run trains from scratch in demo/run (a resumed run refuses data prepared differently, by design).
set -euo pipefail
CONFIG=examples/demo.yaml

echo "== 1/5 tiny model (offline: random-init Llama + BPE tokenizer trained on the sample)"
[ -f demo/model/config.json ] || zerotune tiny-model demo/model --train-text examples/data/data_science_questions.csv

echo "== 2/5 prepare data"
zerotune prep "$CONFIG"

echo "== 3/5 plan"
zerotune plan "$CONFIG" --nodes 1 --gpus-per-node 2

echo "== 4/5 train on 2 CPU ranks (evaluates validation during training and the test split at the end)"
rm -rf demo/run
zerotune launch "$CONFIG" --num-gpus 2

echo "== 5/5 export and ask"
zerotune export demo/run --tag best --out demo/export
python examples/ask.py demo/export "What is overfitting?"
