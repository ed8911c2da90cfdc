"""Stage 7, the data report: report.json, a printed summary table, lengths.png, and warnings.

Warning rules (each is a rough guard against a classic mistake, not a law):
  * too few supervised tokens: for text (continued pretraining) below 20 tokens per model parameter, the
    Chinchilla-style compute-optimal ratio (Hoffmann et al., 2022); fewer is normal for continued
    pretraining of a pretrained model but will underfit a model trained from scratch. For SFT below
    1,000,000 supervised training tokens, about the size of the smallest fine-tuning sets reported to work
    well (LIMA: ~1,000 curated examples); below that expect overfitting within a few epochs.
  * duplicate rate above 10% of rows read; any prompt shared across splits (train/test overlap);
    more than 5% of documents truncated or dropped as too long; any row left without a supervised token;
    more than 20% of rows sharing their prompt's first 200 characters with another row (redundant context);
    any near-duplicate rows (equal to another kept row once case, spacing and punctuation are ignored; exact
    duplicates are already dropped, these are not);
    an empty validation or test split although its fraction is above 0; any bad row (dropped, with its
    reason and location per source); any row whose data held a special-token string (kept as text).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

SFT_MIN_SUPERVISED_TOKENS = 1_000_000
PRETRAIN_TOKENS_PER_PARAM = 20
MAX_DUPLICATE_SHARE = 0.10
MAX_TRUNCATED_SHARE = 0.05
MAX_REDUNDANT_CONTEXT_SHARE = 0.20


@dataclass
class Facts:
    """What the report needs beyond the manifest (per-document arrays over the kept rows)."""

    kind: str
    seq_len: int
    raw_lengths: np.ndarray  # tokens per document before truncation
    overlap: dict
    prefix_hashes: np.ndarray
    params: int | None
    near_hashes: np.ndarray | None = None  # content ignoring case, spacing and punctuation, per kept row
    cleaning_steps: list | None = None  # the opt-in cleaning steps that ran (text is otherwise kept as written)
    special_text_rows: int = 0  # rows whose data held a special-token string (tokenized as text)
    sources: list | None = None  # per source: record type, rows read, documents, bad rows


def count_params(model_path: str, revision: str | None = None) -> int | None:
    """Parameters of the model in model_path's config.json, counted on the meta device (no weights loaded)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model_path, revision=revision)
        # The meta device allocates nothing; unlike accelerate's init_empty_weights it also keeps tied
        # embeddings tied, so they count once, as in the loaded model.
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return int(sum(p.numel() for p in model.parameters()))
    except Exception:  # noqa: BLE001 - the count only feeds a warning; no config.json means no warning
        return None


def redundant_context(prefix_hashes: np.ndarray) -> dict:
    """Rows whose prompt starts like another row's (same first 200 characters), and the largest groups."""
    hashes = prefix_hashes[prefix_hashes != 0]
    if not len(hashes):
        return {"rows_sharing_context": 0, "share": 0.0, "largest_groups": []}
    _, counts = np.unique(hashes, return_counts=True)
    shared = int(counts[counts > 1].sum())
    return {"rows_sharing_context": shared, "share": round(shared / len(hashes), 4),
            "largest_groups": sorted((int(c) for c in counts[counts > 1]), reverse=True)[:5]}


def near_duplicates(near_hashes: np.ndarray | None) -> dict:
    """Kept rows that repeat an earlier kept row once case, spacing and punctuation are ignored."""
    if near_hashes is None or not len(near_hashes):
        return {"rows": 0, "share": 0.0}
    extra = int(len(near_hashes) - len(np.unique(near_hashes)))
    return {"rows": extra, "share": round(extra / len(near_hashes), 4)}


def length_stats(lengths: np.ndarray, seq_len: int) -> dict:
    """Summary of document token lengths (before truncation)."""
    if not len(lengths):
        return {}
    q = np.percentile(lengths, [50, 90, 99])
    return {"documents": int(len(lengths)), "min": int(lengths.min()), "mean": round(float(lengths.mean()), 1),
            "p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2]), "max": int(lengths.max()),
            "over_seq_len": int((lengths > seq_len).sum())}


def _total(manifest: dict, key: str) -> int:
    return sum(s[key] for s in manifest["splits"].values())


def _dropped(manifest: dict, reason: str) -> int:
    return sum(s["rows_dropped"][reason] for s in manifest["splits"].values())


def warnings_for(manifest: dict, facts: Facts, context: dict, near: dict | None = None) -> list[str]:
    """The classic-mistake warnings (rules in this module's docstring)."""
    out: list[str] = []
    train = manifest["splits"]["train"]
    sup = train["supervised_tokens"]
    if facts.kind == "text" and facts.params and sup < PRETRAIN_TOKENS_PER_PARAM * facts.params:
        out.append(f"few tokens for the model size: {sup:,} supervised training tokens for {facts.params:,} "
                   f"parameters ({sup / facts.params:.2g} per parameter; ~{PRETRAIN_TOKENS_PER_PARAM} is "
                   f"compute-optimal for pretraining). Fine for continued pretraining, not for training from scratch")
    elif facts.kind != "text" and sup < SFT_MIN_SUPERVISED_TOKENS:
        out.append(f"small fine-tuning set: {sup:,} supervised training tokens (< {SFT_MIN_SUPERVISED_TOKENS:,}); "
                   f"expect overfitting within a few epochs: use few epochs, early stopping and a low lr")
    rows = _total(manifest, "rows_read")
    dups = _dropped(manifest, "duplicate")
    if rows and dups / rows > MAX_DUPLICATE_SHARE:
        out.append(f"high duplicate rate: {dups:,} of {rows:,} rows ({dups / rows:.0%}) were exact duplicates")
    if near and near["rows"]:
        out.append(f"near-duplicates: {near['rows']:,} kept rows equal another row once case, spacing and "
                   f"punctuation are ignored (not removed: exact deduplication only); review or deduplicate them")
    shared = {k: v for k, v in facts.overlap.items() if v}
    if shared:
        out.append("prompts shared across splits (the same prompt with different responses): "
                   + ", ".join(f"{k} {v}" for k, v in shared.items()) + "; evaluation on them is optimistic")
    docs = _total(manifest, "documents")
    cut = _total(manifest, "truncated_documents") + _dropped(manifest, "too_long")
    if docs and cut / (docs + _dropped(manifest, "too_long")) > MAX_TRUNCATED_SHARE:
        out.append(f"many over-length rows: {cut:,} rows were longer than seq_len {facts.seq_len} (truncated or "
                   f"dropped); raise data.seq_len or shorten them")
    bad = _dropped(manifest, "bad_row")
    if bad:
        first = next((r for s in facts.sources or [] for r in s["first_bad_rows"]), "")
        out.append(f"{bad:,} bad rows dropped (see sources in report.json for reasons and locations), e.g. {first}")
    if facts.special_text_rows:
        out.append(f"{facts.special_text_rows:,} rows contain special-token strings (e.g. <|im_end|>) in their text; "
                   f"they were tokenized as ordinary text, not as the template's special tokens")
    if _dropped(manifest, "no_supervised_tokens"):
        out.append(f"{_dropped(manifest, 'no_supervised_tokens'):,} rows had no supervised token after templating "
                   f"(no assistant turn, or truncation cut the whole response) and were dropped")
    if context["share"] > MAX_REDUNDANT_CONTEXT_SHARE:
        out.append(f"redundant context: {context['rows_sharing_context']:,} rows ({context['share']:.0%}) share "
                   f"their prompt's opening with another row (largest groups {context['largest_groups']}); "
                   f"consider merging them into multi-turn conversations or deduplicating the context")
    for split, frac_key in (("validation", "validation_fraction"), ("test", "test_fraction")):
        if manifest["settings"][frac_key] > 0 and not manifest["splits"][split]["documents"]:
            out.append(f"the {split} split is empty although data.{frac_key} is {manifest['settings'][frac_key]}; "
                       f"add data or raise the fraction")
    return out


def build_report(manifest: dict, facts: Facts) -> dict:
    """report.json's content."""
    context = redundant_context(facts.prefix_hashes)
    near = near_duplicates(facts.near_hashes)
    return {"record_type": facts.kind, "seq_len": facts.seq_len, "model_params": facts.params,
            "cleaning": {"text": "NFC, unified line endings", "opt_in_steps": facts.cleaning_steps or []},
            "rows_with_special_token_text": facts.special_text_rows, "sources": facts.sources or [],
            "document_lengths": length_stats(facts.raw_lengths, facts.seq_len),
            "cross_split_prompt_overlap": facts.overlap, "redundant_context": context, "near_duplicates": near,
            "splits": {k: {f: v for f, v in s.items() if f != "shards"} for k, s in manifest["splits"].items()},
            "warnings": warnings_for(manifest, facts, context, near)}


def plot_lengths(lengths: np.ndarray, seq_len: int, path: Path) -> None:
    """Histogram of document token lengths with the seq_len cut marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Counted here, drawn as weighted bins: matplotlib's own counting copied the lengths as floats, a
    # transient at the last memory peak of a run.
    counts, edges = np.histogram(lengths, bins=min(60, max(10, len(np.unique(lengths)))))
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(edges[:-1], bins=edges, weights=counts, color="#4c72b0")
    ax.axvline(seq_len, color="#c44e52", linestyle="--", label=f"seq_len {seq_len}")
    ax.set_xlabel("document length (tokens, after templating)")
    ax.set_ylabel("documents")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def format_summary(manifest: dict, report: dict, out_dir: Path) -> str:
    """The compact table printed at the end of prep."""
    head = f"{'split':<11}{'rows':>8}{'dropped':>9}{'docs':>8}{'tokens':>11}{'supervised':>12}{'seqs':>7}{'pack':>7}"
    lines = [f"prepared {out_dir} (seq_len {manifest['seq_len']}, {manifest['record_type']}, "
             f"packing {'on' if manifest['packing'] else 'off'})", head]
    for name, s in manifest["splits"].items():
        lines.append(f"{name:<11}{s['rows_read']:>8}{sum(s['rows_dropped'].values()):>9}{s['documents']:>8}"
                     f"{s['tokens']:>11}{s['supervised_tokens']:>12}{s['sequences']:>7}{s['packing_efficiency']:>7.3f}")
    reasons = {r: sum(s["rows_dropped"][r] for s in manifest["splits"].values()) for r in
               next(iter(manifest["splits"].values()))["rows_dropped"]}
    lines.append("dropped by reason: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    for src in report.get("sources", []) if len(report.get("sources", [])) > 1 else []:
        lines.append(f"source {src['path']}: {src['record_type']}, {src['rows_read']} rows read, "
                     f"{src['documents']} documents, {src['bad_rows']} bad rows")
    if report.get("cleaning", {}).get("opt_in_steps"):
        lines.append("cleaning steps (opt-in): " + ", ".join(report["cleaning"]["opt_in_steps"]))
    lines.extend(f"warning: {w}" for w in report["warnings"])
    return "\n".join(lines)


def print_summary(manifest: dict, report: dict, out_dir: Path) -> None:
    """Print :func:`format_summary`."""
    print(format_summary(manifest, report, out_dir))
