"""normalize-score: recompute CER/F1 of evaluation outputs on normalized text (stages/lib/metrics.py).

One file (the original's count_score):
    python -m stages.score --input results/x.json --output results/x_norm.json
The DVC stage (no --input): results/NAME.json of every run of params.yaml `runs` (stages/lib/runs.py)
-> scored/NAME.json; metrics/score_details.json, every figure (the main run's at the top level, the
others under `baselines.NAME`; `truncated_predictions` counts finish_reason "length", with a
warning), with per run the scoring views (stages/lib/metrics.py VIEWS), the per-tag table and the
confidence figures (stages/lib/breakdowns.py), and `pairs.MAIN_vs_NAME`, the paired comparison of
the main run with each other run (stages/lib/paired.py; each main-run sample gets `paired.NAME`:
its CER and F1 minus the other run's on the same page, null where that run has none);
metrics/score.json, the DVC metric, only the headline figures (the main run's CER/F1 with
intervals, the others' CER/F1, every run's failure-mode rates, every pair's differences, intervals
and p-values); review/NAME.csv (least confident first); plots/score/cer_histogram.{csv,png},
cer_by_length.{csv,png}, cer_by_confidence.{csv,png} and tags/NAME.png.

Failure modes: every scored sample gets `flags`, the failure modes it shows, as defined (each
one precisely) in stages/lib/failures.py: repetition, text_on_empty, chatter, markup, truncated,
empty, script_confusion, length_ratio; the document gets `failures` (counts) and `failure_rates`
(shares of the scored samples). A failed sample's flags are null. Both modes compute them.

Input: an evaluation output {"overall_cer", "overall_f1", "total_samples", "timestamp", "model_name",
"samples": [{"image_path", "label", "prediction", "cer_score", "f1_score", ...}], ...}.
Output: the same document, samples in input order, every field kept (label and prediction as they
came); `cer_score`/`f1_score` and `overall_cer`/`overall_f1` are recomputed on normalized text and
the evaluation's raw figures move to `raw_cer_score`/`raw_f1_score`/`raw_overall_cer`/
`raw_overall_f1`. The other aggregates (macro_cer, micro_f1, exact_match, ..., bootstrap intervals)
are added beside them. A sample with a non-empty `error` field (no prediction was obtained) is
not scored: its scores are null and it is counted in `failed_samples`.
"""
import argparse
import contextlib
import gc
import itertools
import json
import mmap
import os
import sys
from pathlib import Path

import orjson

from .lib import breakdowns as B
from .lib import failures
from .lib import metrics as M
from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.io import atomic_dir, atomic_write_bytes, atomic_write_text, clean_surrogates
from .lib.runs import RAW_DIR, SCORED_DIR, load_runs, raw_path, scored_path

METRICS = "metrics/score.json"
DETAILS = "metrics/score_details.json"
REVIEW_DIR = "review"
PLOT_DIR = "plots/score"
PARAMS = ["score", "runs"]
CER_BINS = [i / 10 for i in range(11)]  # [0, 0.1), ..., [0.9, 1.0), then [1.0, inf)


# ---------------------------------------------------------------- reading

def load_evaluation(path):
    """The evaluation document with a 'samples' list; every problem is one UserError line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        doc = parse_mapped(path)  # orjson: several times faster than json on 200k samples
    except orjson.JSONDecodeError:
        try:
            # also accepts NaN/Infinity, which a Python writer may emit, and lone surrogates (cleaned)
            doc = clean_surrogates(json.loads(path.read_bytes()))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            where = f" ({err.msg} at line {err.lineno} column {err.colno})" if isinstance(err, json.JSONDecodeError) else ""
            raise UserError(f"{path}: not valid JSON{where}") from None
    if not isinstance(doc, dict) or "samples" not in doc:
        raise UserError(f"{path}: expected an object with a 'samples' list (an evaluation output)")
    if not isinstance(doc["samples"], list):
        raise UserError(f"{path}: 'samples' must be a list, got {type(doc['samples']).__name__}")
    return doc


def parse_mapped(path):
    """orjson.loads of the file read through a memory map: reading it into a bytes object first
    costs a copy and fresh memory for the whole file (~0.04 s on 200,000 samples)."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return orjson.loads(b"")  # mmap cannot map an empty file; this raises JSONDecodeError
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped, memoryview(mapped) as view:
            return orjson.loads(view)


def read_samples(samples, path):
    """(samples to score, failed samples, labels and predictions of the samples to score), every
    field checked.

    A sample with a non-empty `error` field failed to get a prediction (evaluation stores null):
    it needs a label only. One pass, as this runs on every sample (the samples are scattered in
    memory, so each extra pass over them costs cache misses more than Python work)."""
    scored, failed, labels, predictions = [], [], [], []
    for i, sample in enumerate(samples):
        if not isinstance(sample, dict):
            raise UserError(f"{path}: samples[{i}]: expected an object, got {type(sample).__name__}")
        bad = bool(sample.get("error"))
        label, prediction = sample.get("label"), sample.get("prediction")
        if not isinstance(label, str) or not (bad or isinstance(prediction, str)):
            raise field_error(path, i, sample, ("label",) if bad else ("label", "prediction"))
        if bad:
            failed.append(sample)
        else:
            scored.append(sample)
            labels.append(label)
            predictions.append(prediction)
    return scored, failed, labels, predictions


def field_error(path, index, sample, fields):
    for field in fields:
        if field not in sample:
            return UserError(f"{path}: samples[{index}]: field '{field}' missing")
        if not isinstance(sample[field], str):
            return UserError(f"{path}: samples[{index}]: field '{field}' must be a string, "
                             f"got {type(sample[field]).__name__}")
    raise AssertionError("field_error called on a valid sample")


# ---------------------------------------------------------------- scoring

def score_document(doc, path, bootstrap_samples, seed):
    """(scored document, summary, scores of the scored samples). `doc` is updated in place."""
    samples = doc["samples"]
    scored, failed, labels, predictions = read_samples(samples, path)
    if not labels:
        raise UserError(f"{path}: no sample to score ({len(samples)} samples, all failed or none)")
    norm_labels, norm_preds = M.normalize_many(labels), M.normalize_many(predictions)
    scores = M.score_pairs(norm_labels, norm_preds)
    flags, counts = failures.flag_samples(labels, predictions, norm_labels, norm_preds, scores,
                                          [s.get("finish_reason") for s in scored])
    summary = {"total_samples": len(samples), "scored_samples": len(labels),
               "failed_samples": len(failed), "truncated_predictions": counts["truncated"],
               **M.summarize(scores, bootstrap_samples, seed),
               "failures": counts, "failure_rates": {name: count / len(labels) for name, count in counts.items()}}

    # Scored samples first, then failed ones: the order of the keys within each sample is what
    # counts (raw_* are added first), and it is the same either way.
    rescored = itertools.chain(zip(scored, scores["cer"].tolist(), scores["f1"].tolist(), flags),
                               zip(failed, *itertools.repeat(itertools.repeat(None), 3)))
    for sample, cer, f1, sample_flags in rescored:
        sample["raw_cer_score"], sample["raw_f1_score"] = sample.get("cer_score"), sample.get("f1_score")
        sample["cer_score"], sample["f1_score"], sample["flags"] = cer, f1, sample_flags
    scores.update(samples=scored, labels=labels, predictions=predictions, norm_labels=norm_labels,
                  norm_preds=norm_preds)

    out = {key: value for key, value in doc.items() if key != "samples"}
    out["raw_overall_cer"], out["raw_overall_f1"] = doc.get("overall_cer"), doc.get("overall_f1")
    out.update(summary)
    out["scoring"] = {"normalized": True, "definitions": "stages/lib/metrics.py",
                      "bootstrap_samples": bootstrap_samples, "bootstrap_seed": seed}
    out["samples"] = samples
    return out, summary, scores


def write_json(path, obj):
    """orjson's bytes written atomically: encoding to text first would decode and re-encode the
    whole document (about 0.2 s on 200,000 samples)."""
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))


def describe(path, summary):
    line = (f"{path}: CER {summary['overall_cer']:.4f}, F1 {summary['overall_f1']:.4f} (normalized text), "
            f"{summary['scored_samples']} scored, {summary['failed_samples']} failed")
    if "overall_cer_ci95_low" in summary:
        line += (f" (CER 95% CI {summary['overall_cer_ci95_low']:.4f}-{summary['overall_cer_ci95_high']:.4f}, "
                 f"F1 {summary['overall_f1_ci95_low']:.4f}-{summary['overall_f1_ci95_high']:.4f})")
    return line


# ---------------------------------------------------------------- plot data

def cer_histogram(cers):
    """[(bin label, samples)] over CER_BINS; the last bin holds every CER of 1.0 or more."""
    labels = [f"{lo:.1f}-{hi:.1f}" for lo, hi in zip(CER_BINS, CER_BINS[1:])] + [f"{CER_BINS[-1]:.1f}+"]
    counts = [0] * len(labels)
    for value in cers:
        counts[min(int(value * 10), len(labels) - 1)] += 1  # k/10 * 10 is never below k in floats
    return list(zip(labels, counts))


def bucket_label(lo, hi):
    # plain numbers, as the analyze stage labels them; dvc.yaml's template keeps the file's order
    return f"{lo}+" if hi is None else f"{lo}" if lo == hi else f"{lo}-{hi}"


def cer_by_length(scores):
    """{bucket label: (corpus CER, samples)} by normalized label length, non-empty buckets only."""
    sums = {}
    for distance, ref_len in zip(scores["distance"].tolist(), scores["ref_len"].tolist()):
        bucket = M.length_bucket(ref_len)
        d, r, n = sums.get(bucket, (0, 0, 0))
        sums[bucket] = (d + distance, r + ref_len, n + 1)
    return {bucket_label(lo, hi): (M.cer_value(d, r), n) for (lo, hi), (d, r, n) in sorted(sums.items())}


def write_plots(scores_by_run, plot_dir):
    """CSV plot data (one column per run) and the same data drawn as PNGs."""
    plot_dir = Path(plot_dir)
    runs = list(scores_by_run)
    histograms = {run: cer_histogram(scores["cer"].tolist()) for run, scores in scores_by_run.items()}
    bins = [label for label, _ in histograms[runs[0]]]
    rows = [[label, *(histograms[run][i][1] for run in runs)] for i, label in enumerate(bins)]
    atomic_write_text(plot_dir / "cer_histogram.csv", to_csv(["cer_bin", *runs], rows))

    by_length = {run: cer_by_length(scores) for run, scores in scores_by_run.items()}
    buckets = sorted(set().union(*by_length.values()))
    rows = [[b, *(round(by_length[run][b][0], 6) if b in by_length[run] else "" for run in runs),
             *(by_length[run].get(b, (None, 0))[1] for run in runs)] for b in buckets]
    atomic_write_text(plot_dir / "cer_by_length.csv",
                      to_csv(["length_bucket", *runs, *(f"{run}_samples" for run in runs)], rows))

    draw_bars(bins, {run: [n for _, n in histograms[run]] for run in runs}, "per-sample CER (normalized text)",
              "samples", "Per-sample CER", plot_dir / "cer_histogram.png")
    draw_bars(buckets, {run: [by_length[run][b][0] if b in by_length[run] else 0 for b in buckets] for run in runs},
              "label length (normalized characters)", "CER (summed distance / summed label length)",
              "CER by label length", plot_dir / "cer_by_length.png")


def to_csv(header, rows):
    return "\n".join(",".join(str(cell) for cell in row) for row in [header, *rows]) + "\n"


def draw_bars(categories, series, xlabel, ylabel, title, path):
    """Grouped bars: one group per category, one bar per run."""
    from .lib.figures import new_figure, save_figure  # matplotlib only when plots are written

    fig, ax = new_figure(9, 4.5)
    width = 0.8 / len(series)
    for k, (run, values) in enumerate(series.items()):
        ax.bar([i + (k - (len(series) - 1) / 2) * width for i in range(len(categories))], values, width, label=run)
    ax.set_xticks(range(len(categories)), categories, rotation=30, ha="right")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    save_figure(fig, path)


# ---------------------------------------------------------------- modes

def metrics_block(summary):
    """Figures as they go to metrics/score.json (floats rounded for readable `dvc metrics diff`)."""
    return rounded(summary)


def score_one(args):
    output = args.output or str(Path(args.input).with_name(Path(args.input).stem + "_norm.json"))
    out, summary, _ = score_document(load_evaluation(args.input), args.input, args.bootstrap_samples, args.seed)
    write_json(output, out)
    print(f"score: {describe(output, summary)}")


def score_stage(args, runs):
    """All runs are read and scored before anything is written (bad input leaves no output)."""
    scored = {}
    for run in runs:
        path = raw_path(run, args.results_dir)
        scored[run] = score_document(load_evaluation(path), path, args.bootstrap_samples, args.seed)
    details = stage_details(args, scored)
    with atomic_dir(args.scored_dir, inputs=[args.results_dir]) as tmp:
        for run, (out, summary, _) in scored.items():
            write_json(Path(tmp) / f"{run}.json", out)
            print(f"score: {describe(scored_path(run, args.scored_dir), summary)}")
            if summary["truncated_predictions"]:
                print(f"warning: {run}: {summary['truncated_predictions']} of {summary['scored_samples']} predictions "
                      "were cut by the token limit (finish_reason 'length'; the evaluate stage's warning tells "
                      "loops, where a higher limit would not help, from a limit below the label's length)", file=sys.stderr)
    with atomic_dir(args.review_dir) as tmp:
        for run, (_, _, scores) in scored.items():
            order = details["runs"][run].pop("review_order")
            if order:
                atomic_write_text(Path(tmp) / f"{run}.csv", B.review_csv(scores["samples"], scores, order))
    main_run, *baselines = runs
    write_json(args.details, details_document(details, scored, main_run, baselines))
    write_json(args.metrics, headline(details, scored, main_run, baselines))
    write_plots({run: scores for run, (_, _, scores) in scored.items()}, args.plots_dir)
    write_breakdown_plots(details, args.plots_dir)
    print(f"score: figures -> {args.metrics}, {args.details}, {args.plots_dir}/, {args.review_dir}/")


def stage_details(args, scored):
    """Per run: scoring views, tags, confidence; per pair (main run vs each other run): the paired
    comparison, whose per-sample differences go into the main run's samples (`paired`)."""
    runs = {}
    for run, (out, _, scores) in scored.items():
        samples = scores["samples"]
        confidence, order = B.confidence_figures(samples, scores)
        runs[run] = {"views": M.view_figures(scores["labels"], scores["predictions"], scores["norm_labels"],
                                             scores["norm_preds"]),
                     "tags": B.tag_table(samples, scores, args.failure_f1, args.bootstrap_samples, args.seed),
                     "failure_f1": args.failure_f1,
                     "failure_rate": float((scores["f1"] <= args.failure_f1).mean()),
                     "confidence_source": out.get("confidence_source"),
                     "confidence": confidence, "review_order": order}
    main_run, *others = scored
    main_scores = scored[main_run][2]
    pairs = {}
    for other in others:
        figures, diffs = B.compare_runs(main_scores["samples"], main_scores, scored[other][2]["samples"],
                                        scored[other][2], args.bootstrap_samples, args.seed)
        pairs[f"{main_run}_vs_{other}"] = figures
        for i, sample in enumerate(main_scores["samples"]):
            cer_diff, f1_diff = diffs.get(i, (None, None))
            sample.setdefault("paired", {})[other] = {"cer_diff": cer_diff, "f1_diff": f1_diff}
    return {"runs": runs, "pairs": pairs}


def details_document(details, scored, main_run, baselines):
    """metrics/score_details.json: every figure, in the shape metrics/score.json used to have (the
    main run's figures at the top level, the others under baselines.NAME), plus `pairs`."""
    block = lambda run: {**metrics_block(scored[run][1]), **rounded(details["runs"][run])}  # noqa: E731
    return {**block(main_run), "baselines": {run: block(run) for run in baselines},
            "pairs": rounded(details["pairs"])}


HEADLINE_KEYS = ("overall_cer", "overall_cer_ci95_low", "overall_cer_ci95_high",
                 "overall_f1", "overall_f1_ci95_low", "overall_f1_ci95_high")
PAIR_KEYS = ("cer_diff", "cer_diff_ci95_low", "cer_diff_ci95_high", "cer_p",
             "f1_diff", "f1_diff_ci95_low", "f1_diff_ci95_high", "f1_p")


def headline(details, scored, main_run, baselines):
    """metrics/score.json, the DVC metric: the figures a user compares across experiments only."""
    def block(run, keys):
        summary = metrics_block(scored[run][1])
        return {**{k: summary[k] for k in keys if k in summary}, "failure_rates": summary["failure_rates"]}

    return {**block(main_run, HEADLINE_KEYS),
            "baselines": {run: block(run, ("overall_cer", "overall_f1")) for run in baselines},
            "pairs": {name: {k: v for k, v in rounded(pair).items() if k in PAIR_KEYS}
                      for name, pair in details["pairs"].items()}}


def rounded(obj):
    """Floats rounded to 6 places, all the way down (readable `dvc metrics diff`)."""
    if isinstance(obj, float):
        return round(obj, 6)
    if isinstance(obj, dict):
        return {k: rounded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v) for v in obj]
    return obj


def write_breakdown_plots(details, plot_dir):
    """plots/score/tags/NAME.png (per tag: CER and failure rate) and plots/score/cer_by_confidence.{csv,png}."""
    from .lib.figures import new_figure, save_figure

    plot_dir = Path(plot_dir)
    with atomic_dir(plot_dir / "tags") as tmp:
        for run, figures in details["runs"].items():
            if figures["tags"]:
                tags = list(figures["tags"])
                draw_bars(tags, {"corpus CER": [figures["tags"][t]["overall_cer"] for t in tags],
                                 f"failure rate (F1 <= {figures['failure_f1']:g})":
                                 [figures["tags"][t]["failure_rate"] for t in tags]},
                          "tag", "share", f"{run}: CER and failure rate per tag", Path(tmp) / f"{run}.png")
    rows = [[run, d["decile"], d["samples"], round(d["confidence_low"], 6), round(d["confidence_high"], 6),
             round(d["cer"], 6)]
            for run, figures in details["runs"].items() if figures["confidence"]
            for d in figures["confidence"]["deciles"]]
    atomic_write_text(plot_dir / "cer_by_confidence.csv",
                      to_csv(["run", "decile", "samples", "confidence_low", "confidence_high", "cer"], rows))
    fig, ax = new_figure(7, 4.5)
    for run, figures in details["runs"].items():
        if figures["confidence"]:
            deciles = figures["confidence"]["deciles"]
            ax.plot([d["decile"] for d in deciles], [d["cer"] for d in deciles], marker="o",
                    label=f"{run} ({figures['confidence_source']})")
    ax.set_xlabel("confidence decile (1 = least confident)")
    ax.set_ylabel("CER (normalized)")
    ax.set_title("CER by confidence decile")
    if rows:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no run recorded a confidence", ha="center", va="center", transform=ax.transAxes)
    save_figure(fig, plot_dir / "cer_by_confidence.png")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="score this one evaluation output (default: the DVC stage's three)")
    parser.add_argument("--output", help="with --input: where to write (default INPUT_norm.json beside it)")
    parser.add_argument("--results-dir", default=RAW_DIR, help="stage mode: where NAME.json are read")
    parser.add_argument("--scored-dir", default=SCORED_DIR, help="stage mode: where scored NAME.json are written")
    parser.add_argument("--metrics", default=METRICS, help="stage mode: the DVC metrics file")
    parser.add_argument("--plots-dir", default=PLOT_DIR, help="stage mode: the plot data folder")
    parser.add_argument("--details", default=DETAILS, help="stage mode: every figure (the metrics file has the headline ones)")
    parser.add_argument("--review-dir", default=REVIEW_DIR, help="stage mode: review lists NAME.csv, least confident first")
    parser.add_argument("--bootstrap-samples", type=int, help="resamples for the 95%% intervals, 0 for none "
                        "(default params.yaml score.bootstrap_samples)")
    parser.add_argument("--seed", type=int, help="bootstrap seed (default params.yaml score.seed)")
    args = parser.parse_args(argv)
    if args.output and not args.input:
        raise UserError("--output needs --input (the stage mode writes scored/NAME.json)")
    args.runs = None
    if not args.input or args.bootstrap_samples is None or args.seed is None:  # params.yaml only when needed
        params = P.load_params(PARAMS)
        if not args.input:
            args.runs = [run["name"] for run in load_runs(params)]   # the first is the main run
            args.failure_f1 = P.get(params, "score.failure_f1", float, minimum=0.0, maximum=1.0)
        if args.bootstrap_samples is None:
            args.bootstrap_samples = P.get(params, "score.bootstrap_samples", int, minimum=0)
        if args.seed is None:
            args.seed = P.get(params, "score.seed", int, minimum=0)
    if args.bootstrap_samples < 0:
        raise UserError(f"--bootstrap-samples must be 0 or more, got {args.bootstrap_samples}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    return args


def main(argv=None):
    args = parse_args(argv)
    with gc_paused():
        if args.input:
            score_one(args)
        else:
            score_stage(args, args.runs)


@contextlib.contextmanager
def gc_paused():
    """No automatic cyclic garbage collection meanwhile. Scoring creates millions of objects and
    no reference cycles, and every collection walks the young objects, lists of 200,000 labels
    and samples among them: ~0.06 s on 200,000 samples, for nothing."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


if __name__ == "__main__":
    # numpy is first imported below (stages.lib.metrics imports it lazily). The matrix products
    # of the bootstrap are small, and OpenBLAS's thread pool, one busy thread a core, costs
    # ~0.1 s of CPU to start and nothing back; a value set by the user is kept.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    run_main(main)
