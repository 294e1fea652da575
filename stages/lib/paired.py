"""Paired comparison of two runs scored on the same samples (no torch import).

Runs A (the main run) and B are matched sample by sample on the evaluation client's sample key
(image path, image hash, label); only samples scored in both runs count (n pairs). Per pair i,
on normalized text: dd_i = d_A,i - d_B,i (edit distances), r_i the label length, df_i = F1_A,i - F1_B,i.

    cer_diff   = overall CER of A - overall CER of B = sum(dd) / sum(r)   (negative: A has fewer errors)
    f1_diff    = overall F1 of A - overall F1 of B   = mean(df)           (positive: A is better)
    *_ci95_low/high: paired percentile bootstrap, B resamples of the n pairs with replacement
               (each resample keeps A's and B's figure of the same page together), 2.5th/97.5th
               percentiles; resamples and seed as score.bootstrap_samples / score.seed.
    *_p        two-sided paired permutation (sign-flip) test of "A and B are exchangeable on every
               page": each pair's difference has its sign flipped at random, N times
               (N = score.bootstrap_samples); p = (1 + #{|flipped statistic| >= |observed|}) / (1 + N),
               so the smallest p it can give is 1 / (N + 1).
    better / worse / equal: pages where A's CER is lower / higher / the same as B's.

Both resamplings draw counts per distinct value (as metrics.bootstrap_intervals does): pairs with
the same (dd, r), or the same df, are interchangeable.
"""
from . import metrics as M


def compare(a, b, resamples, seed):
    """The figures of the module docstring for two aligned dicts of numpy arrays (distance,
    ref_len, cer, f1), A first."""
    import numpy as np

    dd = a["distance"] - b["distance"]
    ref = a["ref_len"]
    df = a["f1"] - b["f1"]
    n = len(dd)
    out = {"pairs": n, "cer_diff": M.cer_value(int(a["distance"].sum()), int(ref.sum()))
           - M.cer_value(int(b["distance"].sum()), int(ref.sum())),
           "f1_diff": float(df.mean()) if n else 0.0,
           "better": int((a["cer"] < b["cer"]).sum()), "worse": int((a["cer"] > b["cer"]).sum()),
           "equal": int((a["cer"] == b["cer"]).sum())}
    if n == 0 or resamples == 0:
        return out
    rng = np.random.default_rng(seed)
    cer_lo, cer_hi, f1_lo, f1_hi = bootstrap_diff(rng, dd, ref, df, resamples)
    out.update(cer_diff_ci95_low=cer_lo, cer_diff_ci95_high=cer_hi, f1_diff_ci95_low=f1_lo, f1_diff_ci95_high=f1_hi)
    out["cer_p"] = sign_flip_p(rng, dd, resamples)       # sum(r) is the same under every flip
    out["f1_p"] = sign_flip_p(rng, df, resamples)
    return out


def bootstrap_diff(rng, dd, ref, df, resamples):
    import numpy as np

    n = len(dd)
    width = int(ref.max()) + 1
    offset = int(-dd.min()) if len(dd) else 0
    keys, sizes = np.unique((dd + offset) * width + ref, return_counts=True)
    counts = M._resample_counts(rng, n, sizes, resamples)
    sum_dd, sum_ref = counts @ (keys // width - offset), counts @ (keys % width)
    cer = np.where(sum_ref > 0, sum_dd / np.maximum(sum_ref, 1), 0.0)
    values, sizes = np.unique(df, return_counts=True)
    f1 = M._resample_counts(rng, n, sizes, resamples) @ values / n
    tail = 0.025
    return (M.percentile(cer, tail), M.percentile(cer, 1 - tail), M.percentile(f1, tail), M.percentile(f1, 1 - tail))


def sign_flip_p(rng, diffs, resamples, max_cells=4_000_000):
    """Two-sided sign-flip permutation p-value of sum(diffs): for each distinct |value| held by m
    pairs, the flipped sum is value * (2 * Binomial(m, 1/2) - m)."""
    import numpy as np

    observed = abs(float(diffs.sum()))
    values, sizes = np.unique(np.abs(diffs[diffs != 0]), return_counts=True)
    if len(values) == 0:
        return 1.0
    hits, rows = 0, max(1, max_cells // len(values))
    for start in range(0, resamples, rows):
        heads = rng.binomial(sizes, 0.5, size=(min(rows, resamples - start), len(values)))
        flipped = np.abs((2 * heads - sizes) @ values)
        hits += int((flipped >= observed - 1e-9 * max(1.0, observed)).sum())
    return (1 + hits) / (1 + resamples)


def p_text(p):
    return "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
