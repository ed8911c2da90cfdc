"""Data for the data_prep tests: deterministic Q&A rows and file writers (imported by tests and conftest)."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path


_TOPICS = ["overfitting", "gradient descent", "precision", "recall", "a pandas merge", "standardisation",
           "cross-validation", "regularisation", "a random forest", "principal component analysis"]
_WORDS = ("it is a method that helps models generalise by reducing variance and bias on held out data "
          "when features are scaled the optimiser converges faster").split()


def qa_rows(n: int, seed: int = 0) -> list[dict]:
    """n distinct question/answer rows of varied length (10 to ~150 words per answer)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(_TOPICS)
        answer = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(10, 150)))
        rows.append({"question": f"Q{i}: what is {topic}, and why does it matter?",
                     "answer": answer.capitalize() + "."})
    return rows


def write_csv(path: Path, rows: list[dict], columns=("question", "answer")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in rows])
    return path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path
