"""The learning curve's arithmetic (no torch): nested subsets of whole documents, the bootstrap of
each point's CER, the power-law fit and the sentence that reads the curve.

Fit: log(CER) = log(a) - b * log(rows), least squares over the points (every repeat's point). Its
uncertainty: the same percentile bootstrap as each point's interval, one resample of the validation
rows shared by all points (they read the same rows), the fit redone on every resample. A prediction
is made at 2x the largest point only, never further.
"""
import math

from .metrics import bootstrap_intervals, cer_values, percentile, score_pairs
from .training import shuffled_documents

EXTRAPOLATE = 2      # the one prediction: at this many times the largest point
CER_FLOOR = 0.5      # a CER of 0 enters the log fit as half an error over the validation characters


def nested_subsets(rows, sizes, seed):
    """{asked size: rows}: the documents taken are the shortest prefix of a seeded document order with at
    least that many rows (whole documents: a subset may hold a few more rows than asked), so every smaller
    subset lies inside every larger one. The rows keep their order in `rows`: the 'all' subset is `rows`
    itself, what the train stage trains on. `sizes` holds ints or 'all'."""
    documents = shuffled_documents(rows, seed)
    subsets = {}
    for size in sizes:
        want = len(rows) if size == "all" else size
        taken, count = set(), 0
        for key, doc in documents:
            if count >= want:
                break
            taken.add(key)
            count += len(doc)
        keys = {id(row): key for key, doc in documents for row in doc}
        subsets[size] = [row for row in rows if keys[id(row)] in taken]
    return subsets


def pair_scores(references, predictions):
    """Per-row edit distances and reference lengths of one point (strings as given, like val_cer)."""
    return score_pairs(list(references), list(predictions))


def point_interval(scores, resamples, seed):
    """(low, high) 95% bootstrap interval of one point's corpus CER."""
    (low, high), _ = bootstrap_intervals(scores, resamples, seed)
    return low, high


def fit_power_law(rows, cers, floor):
    """(a, b) of CER = a * rows^-b by least squares in log-log; None with fewer than 2 distinct sizes."""
    xs = [math.log(n) for n in rows]
    if len(set(xs)) < 2:
        return None
    ys = [math.log(max(c, floor)) for c in cers]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return math.exp(my - slope * mx), -slope


def fit_with_interval(points, resamples, seed):
    """The power law on `points` [{train_rows, scores}], the prediction at EXTRAPOLATE x the largest
    point, and their bootstrap intervals (validation rows resampled, shared by all points)."""
    import numpy as np

    rows = [p["train_rows"] for p in points]
    total_ref = int(points[0]["scores"]["ref_len"].sum())
    floor = CER_FLOOR / max(total_ref, 1)
    cers = [float(cer_values(p["scores"]["distance"].sum(), p["scores"]["ref_len"].sum())) for p in points]
    fit = fit_power_law(rows, cers, floor)
    if fit is None:
        return None
    target = EXTRAPOLATE * max(rows)
    a, b = fit
    out = {"model": "CER = a * train_rows^-b (least squares on log CER, log train_rows)", "a": a, "b": b,
           "cer_floor": floor, "predict_at_rows": target, "predicted_val_cer": a * target ** -b}
    if resamples > 0:
        rng = np.random.default_rng(seed)
        n = len(points[0]["scores"]["distance"])
        picks = rng.integers(0, n, size=(resamples, n))
        resampled = [cer_values(p["scores"]["distance"][picks].sum(axis=1), p["scores"]["ref_len"][picks].sum(axis=1))
                     for p in points]
        bs, predictions = [], []
        for i in range(resamples):
            again = fit_power_law(rows, [float(c[i]) for c in resampled], floor)
            bs.append(again[1])
            predictions.append(again[0] * target ** -again[1])
        out.update(b_ci95=[percentile(bs, 0.025), percentile(bs, 0.975)],
                   predicted_val_cer_ci95=[percentile(predictions, 0.025), percentile(predictions, 0.975)])
    return out


def mean_by_size(points):
    """[(train_rows, mean val_cer over repeats)] in increasing train_rows."""
    sizes = {}
    for p in points:
        sizes.setdefault(p["train_rows"], []).append(p["val_cer"])
    return sorted((n, sum(v) / len(v)) for n, v in sizes.items())


def reading(points, fit, base_cer):
    """The sentence that reads the curve: the gain of the last doubling (or last step), and what one more
    doubling would give if the fitted trend held."""
    means = mean_by_size(points)
    listed = ", ".join(f"{n} rows {c:.4f}" for n, c in means)
    text = f"Learning curve (validation CER, greedy; base {base_cer:.4f}): {listed}."
    if len(means) < 2:
        return text
    (n0, c0), (n1, c1) = means[-2], means[-1]
    step = "doubling" if n1 == 2 * n0 else f"step (x{n1 / n0:.2f})"
    text += (f" The last {step}, {n0} -> {n1} rows, changed CER by {c1 - c0:+.4f} "
             f"({(c1 - c0) / c0 * 100 if c0 else 0:+.0f}%).")
    if fit:
        interval = ""
        if "predicted_val_cer_ci95" in fit:
            lo, hi = fit["predicted_val_cer_ci95"]
            blo, bhi = fit["b_ci95"]
            interval = f" (95% bootstrap interval {lo:.4f}-{hi:.4f}; exponent b {fit['b']:.2f}, {blo:.2f}-{bhi:.2f})"
        else:
            interval = f" (exponent b {fit['b']:.2f}; no interval: bootstrap_samples is 0)"
        text += (f" A power law fitted to the points, CER = a * rows^-b (CER x{2 ** -fit['b']:.2f} per doubling), "
                 f"predicts {fit['predicted_val_cer']:.4f}{interval} at {fit['predict_at_rows']} rows, one more "
                 "doubling, if the trend held.")
    return text
