"""The score stage's figures beyond one corpus CER/F1 per run (no torch import): per tag, per
confidence decile, the review list and the paired comparisons. Definitions:

Tags. A sample's tags are its `tags` list (split copies them from the raw row; the original's
`focus_layout` string or list is accepted too); a sample with none counts under "untagged" when
other samples have tags. Per tag: samples, overall_cer (corpus) and overall_f1 (mean) with their
95% bootstrap intervals, macro_cer, and failure_rate = share of the tag's samples with F1 <=
score.failure_f1 (0.6, the original's threshold). A sample with two tags counts under both.

Confidence. A sample's `confidence` (evaluation writes it; its source is the document's
`confidence_source`, see stages/lib/evaluation/confidence.py) is a number where higher means
surer. Deciles: the samples with a confidence sorted by it (ties in input order), cut into 10
groups as equal as can be (numpy.array_split); per decile the corpus CER. Review list: the same
order, lowest first. caught_at_K = the share of all edit errors (summed normalized edit distance)
that a person checking the lowest K % of samples (ceil(K/100 * n)) would see; checking K % at
random catches K % on average, so a figure well above K says the confidence is worth using.
"""
import math

from . import metrics as M
from . import paired

UNTAGGED = "untagged"
REVIEW_SHARES = (5, 10, 20)


def tags_of(sample):
    """The sample's tags as a list of strings (`tags`, else `focus_layout`)."""
    tags = sample.get("tags", sample.get("focus_layout"))
    if isinstance(tags, str):
        return [tags] if tags else []
    if isinstance(tags, list):
        return [t for t in tags if isinstance(t, str) and t]
    return []


def subset(scores, indices):
    return {key: scores[key][indices] for key in ("distance", "ref_len", "pred_len", "common", "cer", "f1", "ned",
                                                   "exact")}


def tag_table(samples, scores, failure_f1, resamples, seed):
    """{tag: figures} over the scored samples (module docstring); {} when no sample has a tag."""
    import numpy as np

    members = {}
    for i, sample in enumerate(samples):
        for tag in tags_of(sample) or [UNTAGGED]:
            members.setdefault(tag, []).append(i)
    if set(members) <= {UNTAGGED}:
        return {}
    table = {}
    for tag in sorted(members, key=lambda t: (t == UNTAGGED, t)):
        part = subset(scores, np.array(members[tag]))
        figures = M.summarize(part, resamples, seed)
        table[tag] = {"samples": len(members[tag]),
                      **{k: v for k, v in figures.items() if k.startswith(("overall_", "macro_cer"))},
                      "failure_rate": float((part["f1"] <= failure_f1).mean())}
    return table


def confidences(samples):
    """(indices of the samples that have a numeric confidence, their confidences)."""
    indices, values = [], []
    for i, sample in enumerate(samples):
        value = sample.get("confidence")
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            indices.append(i)
            values.append(float(value))
    return indices, values


def confidence_figures(samples, scores):
    """(figures, review order) of one run, or (None, []) when no sample has a confidence."""
    import numpy as np

    indices, values = confidences(samples)
    if not indices:
        return None, []
    conf = np.full(len(samples), np.nan)
    conf[indices] = values
    order = np.array(indices)[np.argsort(np.array(values), kind="stable")]
    distance = scores["distance"][order]
    total = int(distance.sum())
    deciles = []
    for k, part in enumerate(np.array_split(np.arange(len(order)), min(10, len(order)))):
        picked = order[part]
        deciles.append({"decile": k + 1, "samples": len(picked),
                        "confidence_low": float(conf[picked].min()), "confidence_high": float(conf[picked].max()),
                        "cer": M.cer_value(int(scores["distance"][picked].sum()), int(scores["ref_len"][picked].sum()))})
    caught = {}
    for share in REVIEW_SHARES:
        top = math.ceil(share / 100 * len(order))
        caught[f"caught_at_{share}"] = float(distance[:top].sum() / total) if total else 0.0
    return {"samples_with_confidence": len(order), **caught, "deciles": deciles}, order.tolist()


def review_csv(samples, scores, order):
    """The review list: the samples with a confidence, lowest first."""
    import csv
    import io

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["rank", "image_path", "confidence", "cer", "f1", "flags"])
    for rank, i in enumerate(order, 1):
        sample = samples[i]
        writer.writerow([rank, sample.get("image_path"), sample["confidence"], round(float(scores["cer"][i]), 6),
                         round(float(scores["f1"][i]), 6), " ".join(sample.get("flags") or ())])
    return out.getvalue()


def sample_key(sample):
    """The evaluation client's sample key (stages/lib/evaluation/client.py sample_key)."""
    return f"{sample.get('image_path')}\x00{sample.get('image_sha256')}\x00{sample.get('label')}"


def compare_runs(main_samples, main_scores, other_samples, other_scores, resamples, seed):
    """(paired figures, {main index: (cer diff, f1 diff)}) of the samples scored in both runs."""
    import numpy as np

    where = {sample_key(s): i for i, s in enumerate(other_samples)}
    pairs = [(i, where[key]) for i, key in enumerate(map(sample_key, main_samples)) if key in where]
    a_idx = np.array([i for i, _ in pairs], dtype=np.int64)
    b_idx = np.array([j for _, j in pairs], dtype=np.int64)
    a, b = subset(main_scores, a_idx), subset(other_scores, b_idx)
    figures = paired.compare(a, b, resamples, seed)
    diffs = dict(zip(a_idx.tolist(), zip((a["cer"] - b["cer"]).tolist(), (a["f1"] - b["f1"]).tolist())))
    return figures, diffs
