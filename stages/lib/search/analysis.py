"""Optuna study analysis: load studies read-only, draw the search figures, the top-N trials table.

Figures are matplotlib PNGs (useful offline); `write_html_figures` adds optuna's plotly figures as
self-contained HTML only when plotly is importable. Comparing studies (`studies` lists with more
than one entry) puts them on one figure for the optimization history and the importances; the
parallel coordinates and pruning curves are drawn for the first (main) study.
"""
import html
import importlib.util
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

from ..cli import UserError
from ..figures import new_figure, placeholder_figure, pyplot, save_figure
from ..io import atomic_write_text

MIN_TRIALS_FOR_IMPORTANCE = 2
STATE_COLORS = {"COMPLETE": "tab:blue", "PRUNED": "tab:orange", "FAIL": "tab:red", "RUNNING": "tab:gray",
                "WAITING": "tab:gray"}


def _optuna():
    pyplot()  # Agg backend and fonts before optuna draws anything
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


@contextmanager
def readonly_storage(storage):
    """Yield a storage URL safe to read. A SQLite file is copied to a temp folder first: opening
    it with optuna can write to it (schema checks), and it is a DVC-tracked input. A missing
    SQLite file is an error (optuna would silently create an empty one)."""
    if not storage.startswith("sqlite:///"):
        yield storage
        return
    path = Path(storage[len("sqlite:///"):])
    if not path.is_file():
        raise UserError(f"{path}: study database not found (run the search stage, or pass --storage)")
    tmp = Path(tempfile.mkdtemp(prefix="analyze-study-"))
    try:
        shutil.copy2(path, tmp / path.name)
        yield f"sqlite:///{tmp / path.name}"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_studies(storage, names, shown=None):
    """Load each named study from `storage` (called `shown` in messages); an unknown name lists
    the ones that exist."""
    shown = redact(shown or storage)
    optuna = _optuna()
    try:
        existing = optuna.study.get_all_study_names(storage=storage)
    except Exception as err:  # sqlalchemy / driver errors come in many types
        raise UserError(f"storage {shown}: cannot open ({type(err).__name__}: {str(err).splitlines()[0]})") from None
    studies = []
    for name in names:
        if name not in existing:
            raise UserError(f"study '{name}' not found in {shown} (studies there: {', '.join(existing) or 'none'})")
        study = optuna.load_study(study_name=name, storage=storage)
        if len(study.directions) != 1:
            raise UserError(f"study '{name}': multi-objective studies are not supported")
        studies.append(study)
    return studies


def redact(url):
    """Hide a password in a database URL before printing it."""
    if "://" in url and "@" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}:***@{host}"
    return url


def objective_name(study):
    names = getattr(study, "metric_names", None)
    if names:
        return names[0]
    settings = study.user_attrs.get("ocr_search")  # written by the search stage (search_study.SETTINGS_ATTR)
    if isinstance(settings, dict) and settings.get("objective"):
        return str(settings["objective"])
    return str(study.user_attrs.get("objective", "objective value"))


STATE_WORDS = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running",
               "WAITING": "waiting"}


def counts_text(counts):
    """'5 complete, 6 pruned, 1 failed' (states in that order)."""
    order = list(STATE_WORDS)
    items = sorted(counts.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order))
    return ", ".join(f"{n} {STATE_WORDS.get(state, state.lower())}" for state, n in items)


def state_counts(study):
    counts = {}
    for trial in study.trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def complete_trials(study):
    optuna = _optuna()
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def ranked_trials(study):
    """Complete trials, best first."""
    reverse = study.direction.name == "MAXIMIZE"
    return sorted(complete_trials(study), key=lambda t: (-t.value if reverse else t.value, t.number))


def top_trials_markdown(study, top_n):
    """A Markdown section: trial counts by state and the best `top_n` complete trials."""
    counts = state_counts(study)
    total = sum(counts.values())
    count_text = counts_text(counts) or "none"
    lines = [f"## Study `{study.study_name}`", "",
             f"{total} trials ({count_text}); objective: {objective_name(study)} "
             f"({study.direction.name.lower()}).", ""]
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    if failed:
        lines += ["Failed trials: " + "; ".join(f"#{t.number} {t.user_attrs.get('error', '(no error recorded)')}"
                                                 for t in failed) + ".", ""]
    ranked = ranked_trials(study)[:top_n]
    if not ranked:
        return "\n".join(lines + ["No complete trials yet.", ""])
    param_names = sorted({k for t in ranked for k in t.params})
    header = ["rank", "trial", objective_name(study), *param_names, "duration (s)"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|---" * len(header) + "|")
    for rank, trial in enumerate(ranked, 1):
        cells = [str(rank), str(trial.number), f"{trial.value:.6g}"]
        cells += [format_value(trial.params.get(k, "")) for k in param_names]
        duration = trial.duration.total_seconds() if trial.duration else None
        cells.append(f"{duration:.1f}" if duration is not None else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def format_value(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def history_csv(study):
    """Plot data for DVC: each complete trial's value and the best value so far, by trial number
    (pruned and failed trials have no objective value; the PNG figures show them)."""
    rows = ["trial,value,best_value"]
    best = None
    sign = -1 if study.direction.name == "MAXIMIZE" else 1
    for trial in sorted(complete_trials(study), key=lambda t: t.number):
        best = trial.value if best is None or sign * trial.value < sign * best else best
        rows.append(f"{trial.number},{trial.value},{best}")
    return "\n".join(rows) + "\n"


SEARCH_FIGURES = ("search_history.png", "search_importance.png", "search_parallel_coordinate.png",
                  "search_pruning_curves.png")


def skipped_search_figures(out_dir, reason):
    """Placeholders (and an empty history) when there is no study, so every figure still exists."""
    for name in SEARCH_FIGURES:
        placeholder_figure(Path(out_dir) / name, name[:-4].replace("_", " "), reason)
    atomic_write_text(Path(out_dir) / "search_history.csv", "trial,value,best_value\n")


def plot_history(studies, path):
    """Objective value per trial and the best so far; several studies share the axes."""
    _optuna()
    from optuna.visualization import matplotlib as om

    if not any(complete_trials(s) for s in studies):
        return placeholder_figure(path, "Optimization history", "No complete trials yet.")
    target = objective_name(studies[0])
    ax = om.plot_optimization_history(studies if len(studies) > 1 else studies[0], target_name=target)
    if len(studies) > 1:  # optuna colours a study's best-value line unlike its points: match them
        colors = {c.get_label().rsplit(" of ", 1)[-1]: c.get_facecolor()[0] for c in ax.collections
                  if " of " in str(c.get_label()) and len(c.get_facecolor())}
        for line in ax.lines:
            study_name = str(line.get_label()).rsplit(" of ", 1)[-1]
            if study_name in colors:
                line.set_color(colors[study_name])
                line.set_alpha(0.9)
        ax.legend(bbox_to_anchor=(1.05, 1.0), loc="upper left")
    names = ", ".join(s.study_name for s in studies)
    ax.set_title(f"Optimization history: {names}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    low, high = ax.get_xlim()
    if high - low < 2:  # one trial: matplotlib would label fractions of a trial
        ax.set_xlim((low + high) / 2 - 1, (low + high) / 2 + 1)
    ax.figure.set_size_inches(9, 5)
    save_figure(ax.figure, path)
    return None


def importances(study):
    """(dict param -> importance, None) or (None, reason) when the study cannot support it."""
    optuna = _optuna()
    trials = complete_trials(study)
    if len(trials) < MIN_TRIALS_FOR_IMPORTANCE:
        return None, (f"{study.study_name}: {len(trials)} complete trial(s); parameter importance needs "
                      f"at least {MIN_TRIALS_FOR_IMPORTANCE}")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", UserWarning)
            result = optuna.importance.get_param_importances(study)
    except (ValueError, RuntimeError) as err:
        return None, f"{study.study_name}: parameter importance not available ({str(err).splitlines()[0]})"
    if not result:
        return None, f"{study.study_name}: no searched parameters, so no importance"
    if any("will be equal" in str(w.message) for w in caught):  # PED-ANOVA found no better region
        return None, (f"{study.study_name}: {len(trials)} complete trials do not separate better from worse "
                      "parameter values (optuna: importances would all be equal); run more trials")
    return result, None


def plot_importances(studies, path):
    """Grouped horizontal bars: one group per parameter, one bar per study. Returns the notes
    (studies left out and why)."""
    results = [(s.study_name, *importances(s)) for s in studies]
    notes = [reason for _, imp, reason in results if imp is None]
    usable = [(name, imp) for name, imp, _ in results if imp is not None]
    if not usable:
        placeholder_figure(path, "Parameter importance", "\n".join(notes))
        return notes
    params = sorted({p for _, imp in usable for p in imp}, key=lambda p: max(imp.get(p, 0) for _, imp in usable))
    fig, ax = new_figure(8, 1.2 + 0.5 * len(params) * max(1, len(usable)) ** 0.5)
    height = 0.8 / len(usable)
    for i, (name, imp) in enumerate(usable):
        ys = [j + (i - (len(usable) - 1) / 2) * height for j in range(len(params))]
        bars = ax.barh(ys, [imp.get(p, 0.0) for p in params], height=height, label=name)
        ax.bar_label(bars, fmt="%.2f", padding=2, fontsize=8)
    ax.set_yticks(range(len(params)), params)
    ax.set_xlim(0, 1.12)
    ax.set_xlabel(f"importance for {objective_name(studies[0])} (optuna's default PED-ANOVA, sums to 1)")
    title = f"Parameter importance: {', '.join(name for name, _ in usable)}"
    left_out = [name for name, imp, _ in results if imp is None]
    if left_out:
        title += f" (left out, see the notes: {', '.join(left_out)})"
    ax.set_title(title)
    if len(studies) > 1:
        ax.legend(loc="lower right")
    save_figure(fig, path)
    return notes


def plot_parallel(study, path):
    _optuna()
    from matplotlib.collections import LineCollection
    from optuna.visualization import matplotlib as om

    trials = [t for t in complete_trials(study) if t.params]
    if len(trials) < 2:
        return placeholder_figure(path, "Parallel coordinates",
                                  f"{study.study_name}: {len(trials)} complete trial(s) with parameters; "
                                  "parallel coordinates need at least 2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # an axis with one value: matplotlib widens it
        ax = om.plot_parallel_coordinate(study, target_name=objective_name(study))
    for coll in ax.collections:
        if isinstance(coll, LineCollection):  # optuna's Blues_r draws the worst trial white on grey
            coll.set_cmap("viridis_r")
            coll.set_linewidth(2)
    readable_axis_labels(ax)
    ax.set_title(f"Parallel coordinates: {study.study_name} (complete trials)")
    ax.figure.set_size_inches(9, 5)
    save_figure(ax.figure, path)
    return None


def readable_axis_labels(ax):
    """Optuna draws each parameter's tick labels on its axis, over the trials' lines, and a log
    axis as 2x10^-3: plain numbers (0.002), on a white box. matplotlib still picks which ticks
    get a label."""
    from matplotlib.ticker import FuncFormatter

    def plain(formatter):
        return FuncFormatter(lambda value, pos: f"{value:g}" if formatter(value, pos) else "")

    for axis in ax.figure.axes:
        if axis.get_label() == "<colorbar>":
            continue
        if axis.get_yscale() == "log":
            axis.yaxis.set_major_formatter(plain(axis.yaxis.get_major_formatter()))
            axis.yaxis.set_minor_formatter(plain(axis.yaxis.get_minor_formatter()))
        for label in axis.get_yticklabels(which="both"):
            label.set_bbox({"facecolor": "white", "edgecolor": "none", "alpha": 0.85, "pad": 1.5})


def plot_pruning_curves(study, path):
    """Intermediate values (what the pruner sees) per trial, coloured by the trial's final state;
    a cross marks where a pruned trial stopped."""
    trials = [t for t in study.trials if t.intermediate_values]
    if not trials:
        return placeholder_figure(path, "Pruning curves", f"{study.study_name}: no trial reported intermediate values.")
    fig, ax = new_figure(9, 5)
    seen = set()
    for trial in sorted(trials, key=lambda t: t.number):
        steps = sorted(trial.intermediate_values)
        values = [trial.intermediate_values[s] for s in steps]
        state = trial.state.name
        label = None if state in seen else f"{state.lower()}"
        seen.add(state)
        ax.plot(steps, values, color=STATE_COLORS.get(state, "black"), alpha=0.8, lw=1.4, marker=".", label=label)
        if state == "PRUNED":
            ax.plot(steps[-1], values[-1], "x", color=STATE_COLORS["PRUNED"], ms=9, mew=2)
    best = ranked_trials(study)[:1]
    if best and best[0].intermediate_values:
        steps = sorted(best[0].intermediate_values)
        ax.plot(steps, [best[0].intermediate_values[s] for s in steps], color="navy", lw=2.6,
                label=f"best (trial {best[0].number})")
    counts = state_counts(study)
    ax.set_xlabel("step (evaluation)")
    ax.set_ylabel(f"intermediate {objective_name(study)}")
    ax.set_title(f"Pruning curves: {study.study_name} ({counts.get('PRUNED', 0)} pruned, "
                 f"{counts.get('COMPLETE', 0)} complete, {counts.get('FAIL', 0)} failed)")
    ax.legend(title="final state")
    save_figure(fig, path)
    return None


def write_html_figures(studies, path):
    """Interactive plotly versions of the figures in one self-contained HTML file (plotly.js
    embedded once, no CDN), only when plotly is installed. Returns True when written."""
    if importlib.util.find_spec("plotly") is None:
        return False
    _optuna()
    from optuna import visualization as ov

    main = studies[0]
    target = objective_name(main)
    figures = [ov.plot_optimization_history(studies if len(studies) > 1 else main, target_name=target)]
    if importances(main)[0] is not None:
        figures.append(ov.plot_param_importances(main, target_name=target))
    if complete_trials(main):
        figures.append(ov.plot_parallel_coordinate(main, target_name=target))
    if any(t.intermediate_values for t in main.trials):
        figures.append(ov.plot_intermediate_values(main))
    divs = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    title = f"Optuna study {', '.join(s.study_name for s in studies)}"
    atomic_write_text(path, f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                            f"</head><body><h1>{html.escape(title)}</h1>{''.join(divs)}</body></html>\n")
    return True
