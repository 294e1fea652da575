"""normalize-score: recompute CER/F1 of evaluation outputs on normalized text (stages/lib/metrics.py).

One file (the original's count_score):
    python -m stages.score --input results/x.json --output results/x_norm.json
The DVC stage (no --input): results/NAME.json of every run of params.yaml `runs` (stages/lib/runs.py)
-> scored/NAME.json, metrics/score.json (the main run's figures at the top level, the others under
`baselines.NAME`; `truncated_predictions` counts finish_reason "length", with a warning),
plots/score/cer_histogram.{csv,png} and plots/score/cer_by_length.{csv,png}.

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

from .lib import metrics as M
from .lib import params as P
from .lib.cli import UserError, run_main
from .lib.io import atomic_dir, atomic_write_bytes, atomic_write_text, clean_surrogates
from .lib.runs import RAW_DIR, SCORED_DIR, load_runs, raw_path, scored_path

METRICS = "metrics/score.json"
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
    scores = M.score_pairs(M.normalize_many(labels), M.normalize_many(predictions))
    summary = {"total_samples": len(samples), "scored_samples": len(labels),
               "failed_samples": len(failed), "truncated_predictions": truncated_count(scored),
               **M.summarize(scores, bootstrap_samples, seed)}

    # Scored samples first, then failed ones: the order of the keys within each sample is what
    # counts (raw_* are added first), and it is the same either way.
    rescored = itertools.chain(zip(scored, scores["cer"].tolist(), scores["f1"].tolist()),
                               zip(failed, itertools.repeat(None), itertools.repeat(None)))
    for sample, cer, f1 in rescored:
        sample["raw_cer_score"], sample["raw_f1_score"] = sample.get("cer_score"), sample.get("f1_score")
        sample["cer_score"], sample["f1_score"] = cer, f1

    out = {key: value for key, value in doc.items() if key != "samples"}
    out["raw_overall_cer"], out["raw_overall_f1"] = doc.get("overall_cer"), doc.get("overall_f1")
    out.update(summary)
    out["scoring"] = {"normalized": True, "definitions": "stages/lib/metrics.py",
                      "bootstrap_samples": bootstrap_samples, "bootstrap_seed": seed}
    out["samples"] = samples
    return out, summary, scores


def truncated_count(samples):
    """Predictions cut by the token limit (finish_reason "length"): scored, but not the model's whole
    answer; the stage warns when there are any (raise evaluate.max_tokens, or leave it 'auto')."""
    return sum(1 for s in samples if s.get("finish_reason") == "length")


def write_json(path, obj):
    """orjson's bytes written atomically: encoding to text first would decode and re-encode the
    whole document (about 0.2 s on 200,000 samples)."""
    atomic_write_bytes(path, orjson.dumps(obj, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE))


def describe(path, summary):
    line = (f"{path}: CER {summary['overall_cer']:.4f}, F1 {summary['overall_f1']:.4f}, "
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
    return f"{lo:04d}+" if hi is None else f"{lo:04d}" if lo == hi else f"{lo:04d}-{hi:04d}"


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
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in summary.items()}


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
    with atomic_dir(args.scored_dir, inputs=[args.results_dir]) as tmp:
        for run, (out, summary, _) in scored.items():
            write_json(Path(tmp) / f"{run}.json", out)
            print(f"score: {describe(scored_path(run, args.scored_dir), summary)}")
            if summary["truncated_predictions"]:
                print(f"warning: {run}: {summary['truncated_predictions']} of {summary['scored_samples']} predictions "
                      "were cut by the token limit (finish_reason 'length'): raise evaluate.max_tokens or set it to "
                      "'auto'", file=sys.stderr)
    main_run, *baselines = runs
    metrics = metrics_block(scored[main_run][1])
    metrics["baselines"] = {run: metrics_block(scored[run][1]) for run in baselines}
    write_json(args.metrics, metrics)
    write_plots({run: scores for run, (_, _, scores) in scored.items()}, args.plots_dir)
    print(f"score: figures -> {args.metrics}, {args.plots_dir}/")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="score this one evaluation output (default: the DVC stage's three)")
    parser.add_argument("--output", help="with --input: where to write (default INPUT_norm.json beside it)")
    parser.add_argument("--results-dir", default=RAW_DIR, help="stage mode: where NAME.json are read")
    parser.add_argument("--scored-dir", default=SCORED_DIR, help="stage mode: where scored NAME.json are written")
    parser.add_argument("--metrics", default=METRICS, help="stage mode: the DVC metrics file")
    parser.add_argument("--plots-dir", default=PLOT_DIR, help="stage mode: the plot data folder")
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
