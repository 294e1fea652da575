"""analyze: search figures, error analysis and the results summary (the pipeline's last stage).

As the DVC stage (`python -m stages.analyze`, defaults from params.yaml `analyze:` and
`search.study_name`) it writes:
  plots/analysis/search_*.png      optimization history, parameter importance, parallel
                                   coordinates, pruning curves (intermediate eval_loss per trial)
  plots/analysis/search_history.csv  trial, value, best_value of complete trials (a DVC plot)
  plots/analysis/errors_top_edits.png  the most frequent character errors of the fine-tuned model
                                   (CER histogram and CER by length: plots/score/, the score stage)
  plots/analysis/train_loss.png    train and eval loss from the train stage's dvclive files
  reports/errors.html              the worst N samples: embedded image, label, prediction,
                                   character diff; empty predictions; top confusions (offline)
  reports/errors.json              the same analysis as data, per model
  reports/top_trials.md            the top-N trials of the study
  reports/search.html              the search figures, interactive, only where plotly is
                                   installed (plotly.js embedded: ~5 MB, so in the DVC cache, not git)
  metrics/summary.md               base / fine-tuned / Tesseract CER and F1 with 95% intervals,
                                   and the search's best values (the README includes it)

For any study (the original's analyze_hyperparam_results.py), only the search part:
  python -m stages.analyze --study-name S [--compare S2 S3] [--output-dir D] [--storage URL]
The storage is --storage, else $OCR_SEARCH_STORAGE (the search's PostgreSQL URL, password
included, never on a command line), else the pipeline's sqlite:///models/search/study.db (read
from a copy, never modified). The output dir defaults to studies/S/ (outside the stage's DVC
outputs). `--compare` loads the named studies from the same storage and draws them with S on the
history and importance figures; parallel coordinates and pruning curves are S's. A study with
too few complete trials for importance (or parallel coordinates) gets a figure that says so, and
the command prints a note. The DVC stage always reads models/search/study.db (the search stage
copies a remote study there), so what it draws is what DVC tracked.
--top-n, --worst-n and --top-k-errors override params.yaml's analyze.top_n/worst_n/top_k_errors.

`dvc plots show` (or `dvc plots diff HEAD~1`) draws the top-level `plots:` of dvc.yaml: train and
eval loss (vega, from plots/train/), the search history (plots/analysis/search_history.csv), the
score stage's CER histogram and CER by length, and every PNG above. The vega charts load vega
from a CDN; offline, open the PNGs (or dvc_plots/index.html, whose images still show).
"""
import argparse
import csv
import os
import shutil
import tempfile
from pathlib import Path

from .lib import metrics as M
from .lib import params as P
from .lib import report
from .lib import score_summary
from .lib.search import analysis as S
from .lib.cli import UserError, run_main
from .lib.figures import new_figure, save_figure
from .lib.io import atomic_dir, atomic_write_json, atomic_write_text, read_json
from .lib.runs import load_runs, scored_path

PLOT_DIR = "plots/analysis"
REPORT_DIR = "reports"
ADHOC_DIR = "studies"  # --study-name runs: not inside a DVC output, so they never dirty the pipeline
SUMMARY = "metrics/summary.md"
STORAGE = "sqlite:///models/search/study.db"
STORAGE_ENV = "OCR_SEARCH_STORAGE"  # the search stage's variable (stages/lib/search/study.py)
BEST_PARAMS = "models/search/best_params.json"
SCORE = "metrics/score_details.json"   # every figure of the score stage (metrics/score.json: the headline ones)
TRAIN_METRICS = "metrics/train.json"
TRAIN_PLOTS = "plots/train"
PARAMS = ["analyze", "search.study_name", "runs"]


# ---------------------------------------------------------------- search

def analyze_study(storage, names, out_dir, top_n, html_path):
    """The search figures and the top-N table for studies `names` (the first is the main one),
    and `html_path` (interactive figures) where plotly is installed. Returns the Markdown table,
    the notes (figures that could not be drawn, and why) and the main study's trial counts."""
    out_dir = Path(out_dir)
    with S.readonly_storage(storage) as url:
        studies = S.load_studies(url, names, shown=storage)
        main = studies[0]
        notes = S.plot_importances(studies, out_dir / "search_importance.png")
        for note in (S.plot_history(studies, out_dir / "search_history.png"),
                     S.plot_parallel(main, out_dir / "search_parallel_coordinate.png"),
                     S.plot_pruning_curves(main, out_dir / "search_pruning_curves.png")):
            if note:
                notes.append(note)
        atomic_write_text(out_dir / "search_history.csv", S.history_csv(main))
        S.write_html_figures(studies, html_path)
        table = "\n".join(S.top_trials_markdown(s, top_n) for s in studies)
        counts = S.state_counts(main)
    return table, notes, counts


# ---------------------------------------------------------------- errors

def load_results(runs):
    """{run title: scored result} of every run (scored/NAME.json), the main run first."""
    return {run["title"]: report.check_result(read_json(scored_path(run["name"])), scored_path(run["name"]))
            for run in runs}


def length_bucket(length):
    """(sort key, label) of the score stage's label-length buckets, so that the report's table
    and plots/score/cer_by_length agree."""
    low, high = M.length_bucket(length)
    return low, f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"


def plot_top_edits(analysis, path, k=15):
    """The k most frequent character errors of one model as horizontal bars."""
    items = [(f"{s['label']} → {s['prediction']}", s["count"], "tab:purple") for s in analysis["substitutions"]]
    items += [(f"missed {s['label']}", s["count"], "tab:red") for s in analysis["deletions"]]
    items += [(f"extra {s['prediction']}", s["count"], "tab:green") for s in analysis["insertions"]]
    items = sorted(items, key=lambda t: -t[1])[:k][::-1]
    fig, ax = new_figure(8, 1.2 + 0.32 * max(len(items), 3))
    if items:
        bars = ax.barh(range(len(items)), [c for _, c, _ in items], color=[col for *_, col in items])
        ax.bar_label(bars, padding=2, fontsize=8)
        ax.set_yticks(range(len(items)), [label for label, _, _ in items])
    else:
        ax.text(0.5, 0.5, "no character errors", ha="center", va="center", transform=ax.transAxes)
        ax.set_yticks([])
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("occurrences (normalized text)")
    ax.set_title(f"Most frequent character errors: {analysis['model_name'] or 'fine-tuned'} "
                 "(purple substituted, red missed, green extra)")
    save_figure(fig, path)


# ---------------------------------------------------------------- training curves

def read_tsv_series(path):
    """(steps, values) from a dvclive metric file (timestamp, step, value columns); rows that do
    not parse are skipped."""
    with open(path, encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t"))
    if len(rows) < 2 or "step" not in rows[0]:
        return [], []
    step_col, value_col = rows[0].index("step"), len(rows[0]) - 1
    steps, values = [], []
    for row in rows[1:]:
        try:
            step, value = float(row[step_col]), float(row[value_col])
        except (ValueError, IndexError):
            continue
        steps.append(step)
        values.append(value)
    return steps, values


def plot_loss_curves(train_tsv, eval_tsv, path, best_step=None):
    """Train and eval loss by optimizer step; a dotted line marks the kept (best) checkpoint."""
    fig, ax = new_figure(9, 4.5)
    drawn = False
    for label, tsv, style in (("train loss", train_tsv, "-"), ("eval loss", eval_tsv, "o-")):
        if tsv:
            steps, values = read_tsv_series(tsv)
            if steps:
                ax.plot(steps, values, style, label=label, ms=4)
                drawn = True
    if drawn and isinstance(best_step, (int, float)):
        ax.axvline(best_step, color="gray", ls=":", label=f"best checkpoint (step {best_step:g})")
    if not drawn:
        ax.text(0.5, 0.5, f"no dvclive train/eval loss.tsv under {TRAIN_PLOTS}/", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend()
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("Final training: loss")
    save_figure(fig, path)


# ---------------------------------------------------------------- summary

def interval(block, key):
    """The 95% bootstrap interval that scoring stored for `key` (KEY_ci95_low/high), or None."""
    low, high = block.get(f"{key}_ci95_low"), block.get(f"{key}_ci95_high")
    if isinstance(low, (int, float)) and isinstance(high, (int, float)):
        return low, high
    return None


def _figure(block, key):
    value = block.get(key)
    if not isinstance(value, (int, float)):
        return "n/a"
    ci = interval(block, key)
    return f"{value:.4f} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else f"{value:.4f}"


def _number(value):
    return f"{value:.4f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def summary_markdown(score, best, counts, train, runs):
    """metrics/summary.md: the results table (one row per run of the runs table) and the search's best values."""
    main, *others = runs
    rows = [(main["title"], score)] + [(run["title"], score.get("baselines", {}).get(run["name"])) for run in others]
    lines = ["| model | CER [95% CI] | F1 [95% CI] | exact match | empty predictions | truncated predictions "
             "| scored samples |", "|---|---|---|---|---|---|---|"]
    for name, block in rows:
        if not isinstance(block, dict):
            lines.append(f"| {name} | not scored (no figures in {SCORE}) | | | | | |")
            continue
        scored = block.get("scored_samples", block.get("total_samples", "n/a"))
        if block.get("failed_samples"):
            scored = f"{scored} ({block['failed_samples']} failed, not scored)"
        cells = [name, _figure(block, "overall_cer"), _figure(block, "overall_f1"),
                 _number(block.get("exact_match")), block.get("empty_predictions", "n/a"),
                 block.get("truncated_predictions", "n/a"), scored]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    lines += ["", "CER: summed edit distance / summed reference length on normalized text (may exceed 1); "
              "F1: mean per-sample bag-of-characters F1; intervals: seeded bootstrap.", ""]
    lines += score_summary.sections(score, runs)
    lines += search_summary(best, counts)
    train_text = train_line(train)
    if train_text:
        lines += ["", train_text]
    lines += ["", "Every sample of every run, side by side, sortable and filterable (opens offline): "
              "`browse/index.html`. Figures: `plots/analysis/*.png`, `plots/score/*.png`; "
              "the worst samples with their images: `reports/errors.html`; the best trials: `reports/top_trials.md`."]
    return "\n".join(lines) + "\n"


def train_line(train):
    """One sentence from metrics/train.json (the keys that are there), or ''."""
    num = lambda key: train.get(key) if isinstance(train.get(key), (int, float)) else None  # noqa: E731
    parts = []
    if num("train_loss") is not None:
        parts.append(f"train loss {num('train_loss'):.4g}")
    if num("eval_loss") is not None:
        step = f" (best checkpoint, step {num('best_step')} of {num('global_step')})" if num("best_step") is not None else ""
        parts.append(f"eval loss {num('eval_loss'):.4g}{step}")
    if num("val_cer") is not None:
        base = f" (base {num('val_cer_base'):.4f})" if num("val_cer_base") is not None else ""
        parts.append(f"validation CER {num('val_cer'):.4f}{base}")
    if num("runtime_s") is not None:
        parts.append(f"{num('runtime_s'):.0f} s")
    return f"Final training: {', '.join(parts)}." if parts else ""


def search_summary(best, counts):
    if not isinstance(best, dict) or best.get("skipped"):
        return ["Hyperparameter search: skipped (search.n_trials is 0); training used params.yaml."]
    total = sum(counts.values())
    trials_text = f"{total} trials ({S.counts_text(counts)})" if counts else "no trials"
    params = best.get("params") or {}
    value = best.get("value")
    value_text = f"{value:.6g}" if isinstance(value, (int, float)) else "n/a"
    lines = [f"Hyperparameter search `{best.get('study_name', '')}`: {trials_text}; best trial "
             f"#{best.get('trial', 'n/a')}, {best.get('objective') or 'objective'} {value_text}.", ""]
    if params:
        lines += ["| parameter | best value |", "|---|---|"]
        lines += [f"| {k} | {S.format_value(v)} |" for k, v in sorted(params.items())]
    return lines


# ---------------------------------------------------------------- main

def parse_args(argv, params):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study-name", help="analyze only this study (the original's analyze_hyperparam_results)")
    parser.add_argument("--compare", nargs="+", default=[], metavar="STUDY", help="more studies on the same figures")
    parser.add_argument("--storage", default=None, help=f"Optuna storage URL (default ${STORAGE_ENV}, else {STORAGE})")
    parser.add_argument("--output-dir", default=None, help="where the study figures go (default studies/NAME)")
    parser.add_argument("--top-n", type=int, default=P.get(params, "analyze.top_n", int, minimum=1))
    parser.add_argument("--worst-n", type=int, default=P.get(params, "analyze.worst_n", int, minimum=1))
    parser.add_argument("--top-k-errors", type=int, default=P.get(params, "analyze.top_k_errors", int, minimum=1))
    args = parser.parse_args(argv)
    for flag in ("top_n", "worst_n", "top_k_errors"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if not args.study_name:
        for flag in ("compare", "storage", "output_dir"):
            if getattr(args, flag):
                raise UserError(f"--{flag.replace('_', '-')} goes with --study-name (the stage's own paths are fixed)")
    return args


def run_study_only(args):
    """The original's analyze_hyperparam_results: figures and top_trials.md for named studies.
    Built in a temp folder, then moved file by file into the output dir (other files there stay)."""
    out_dir = Path(args.output_dir or f"{ADHOC_DIR}/{args.study_name}")
    names = list(dict.fromkeys([args.study_name, *args.compare]))
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".analyze-"))
    try:
        storage = args.storage or os.environ.get(STORAGE_ENV, "").strip() or STORAGE
        table, notes, _ = analyze_study(storage, names, tmp, args.top_n, tmp / "search.html")
        atomic_write_text(tmp / "top_trials.md", table)
        for path in sorted(tmp.iterdir()):
            os.replace(path, out_dir / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for note in notes:
        print(f"analyze: note: {note}")
    print(f"analyze: figures and top_trials.md for {', '.join(names)} -> {out_dir}/")


def read_stage_inputs(params):
    """Everything the stage reads, checked before anything is written."""
    runs = load_runs(params)
    best = read_json(BEST_PARAMS)
    if not isinstance(best, dict):
        raise UserError(f"{BEST_PARAMS}: expected an object")
    score = read_json(SCORE)
    if not isinstance(score, dict):
        raise UserError(f"{SCORE}: expected an object")
    train = read_json(TRAIN_METRICS) if Path(TRAIN_METRICS).is_file() else {}
    return {"study_name": P.get(params, "search.study_name", str), "best": best, "score": score,
            "train": train if isinstance(train, dict) else {}, "runs": runs, "results": load_results(runs)}


def run_stage(args, params):
    """The DVC stage: plots/analysis/ and reports/ are built in temp folders and replace the old
    ones only when everything succeeded; metrics/summary.md is written last."""
    inputs = read_stage_inputs(params)
    best = inputs["best"]
    counts, notes = {}, []
    analyses = {name: report.analyze_result(res, top_k=args.top_k_errors, bucket_of=length_bucket)
                for name, res in inputs["results"].items()}
    with atomic_dir(PLOT_DIR) as plot_dir, atomic_dir(REPORT_DIR) as report_dir:
        if best.get("skipped"):
            table = "Hyperparameter search skipped (search.n_trials is 0): no study to analyze.\n"
            S.skipped_search_figures(plot_dir, "Search skipped (search.n_trials is 0).")
        else:
            table, notes, counts = analyze_study(STORAGE, [inputs["study_name"]], plot_dir, args.top_n,
                                                 report_dir / "search.html")
        main = inputs["runs"][0]["title"]
        plot_top_edits(analyses[main], plot_dir / "errors_top_edits.png", k=args.top_k_errors)
        plot_loss_curves(*find_loss_files(TRAIN_PLOTS), plot_dir / "train_loss.png", inputs["train"].get("best_step"))
        atomic_write_text(report_dir / "errors.html", report.errors_html(analyses, args.worst_n))
        atomic_write_json(report_dir / "errors.json", report.analysis_json(analyses))
        atomic_write_text(report_dir / "top_trials.md", table)
    atomic_write_text(SUMMARY, summary_markdown(inputs["score"], best, counts, inputs["train"], inputs["runs"]))
    for note in notes:
        print(f"analyze: note: {note}")
    ft = analyses[inputs["runs"][0]["title"]]
    print(f"analyze: {ft['scored_samples']} samples, {ft['empty_predictions']['count']} empty predictions -> "
          f"{PLOT_DIR}/, {REPORT_DIR}/errors.html, {SUMMARY}")


def find_loss_files(train_dir):
    """dvclive's train and eval loss files under the train stage's plot folder, or None."""
    found = {}
    for path in sorted(Path(train_dir).rglob("loss.tsv")) if Path(train_dir).is_dir() else []:
        kind = path.parent.name
        if kind in ("train", "eval"):
            found.setdefault(kind, path)
    return found.get("train"), found.get("eval")


def main(argv=None):
    params = P.load_params(PARAMS)
    args = parse_args(argv, params)
    if args.study_name:
        run_study_only(args)
    else:
        run_stage(args, params)


if __name__ == "__main__":
    run_main(main)
