"""learning_curve: validation CER against the number of training rows -> metrics/learning_curve.json

How many labeled pages do I need? Each point trains LoRA exactly as the train stage does (the same
hyperparameters, stages/lib/training.py) on a nested subset of the training rows, then reads the same
validation rows greedily (in this process) and scores them (CER, 95% bootstrap interval).

    params.yaml learning_curve.train_rows   sizes, e.g. [20, 40, 80, all] (all = every training row);
                                            [] skips the stage (the outputs say so)
    learning_curve.repeats                  points per size; repeat r draws its subsets with seed + r and
                                            trains with seed + r (repeat 0: the train stage's seed)
    learning_curve.seed                     the order of the documents the subsets take
    learning_curve.bootstrap_samples        resamples of the validation rows (intervals and the fit's)

Subsets keep documents (image folders) whole and are nested: the shortest prefix of one seeded
document order with at least the asked number of rows, so a point may hold a few more rows than
asked (the outputs give both). Outputs:
  metrics/learning_curve.json          the points (rows, CER, interval, eval_loss, best_step), the base's
                                       CER on the same rows, the power-law fit and the sentence that
                                       reads the curve (stages/lib/learning_curve.py says how it is fitted)
  metrics/runtime/learning_curve.json  what each point cost here: wall time, samples/s, peak memory, device
  plots/learning_curve/learning_curve.csv  train_rows, val_cer, interval, base (the `dvc plots` data)
  plots/learning_curve/learning_curve.png  CER against training rows, log x, interval band, base line
"""
import argparse
import csv
import io
import time
from pathlib import Path

from .lib import learning_curve as LC
from .lib import params as P
from .lib.cli import UserError, record_runtime, run_main
from .lib.figures import new_figure, placeholder_figure, save_figure
from .lib.io import atomic_dir, atomic_write_json, atomic_write_text, read_split
from .lib.modeling import IMAGE_PARAMS, resolve_base_dir
from .lib.runtime import RUNTIME_KEYS
from .lib.training import LAUNCH_KEYS, TRAINING_KEYS, split_train_val, training_config

NON_TEST = "data/input/ocr_non_test.json"
WORK_DIR = "models/checkpoints/learning_curve"   # adapters and checkpoints while it runs (git-ignored, deleted)
METRICS = "metrics/learning_curve.json"
# the train stage's run: the 'all' point of repeat 0 is that very training (same rows in the same order,
# same config and seed), so its adapter is read instead of training it again
TRAIN_ADAPTER, TRAIN_METRICS, TRAIN_RUNTIME = "models/lora", "metrics/train.json", "metrics/runtime/train.json"
PLOT_DIR = "plots/learning_curve"
# the training keys of train, minus how train is launched: each point trains in this one process
CURVE_TRAINING_KEYS = [k for k in TRAINING_KEYS if k not in LAUNCH_KEYS]
PARAMS = ["learning_curve", *CURVE_TRAINING_KEYS, IMAGE_PARAMS]


def read_settings(params):
    sizes = P.get(params, "learning_curve.train_rows", list)
    for size in sizes:
        if size != "all" and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise UserError(f"params.yaml: 'learning_curve.train_rows' holds {size!r} (each must be a row count >= 1 "
                            "or 'all')")
    return {"sizes": sizes,
            "repeats": P.get(params, "learning_curve.repeats", int, minimum=1),
            "seed": P.get(params, "learning_curve.seed", int, minimum=0),
            "bootstrap_samples": P.get(params, "learning_curve.bootstrap_samples", int, minimum=0),
            "config": training_config({**{k: params[k] for k in (*CURVE_TRAINING_KEYS, IMAGE_PARAMS) if k in params},
                                       "num_processes": 1})}


def usable_sizes(sizes, n_train):
    """The sizes the training rows allow (a size above them is left out, with a note: default params on a
    small dataset still run), and those left out."""
    over = [s for s in sizes if s != "all" and s > n_train]
    if over:
        print(f"learning_curve: note: train_rows {over} left out: the split leaves {n_train} training rows")
    return [s for s in sizes if s not in over], over


def run_points(settings, base_dir, train_rows, val_rows, work_dir):
    """Train and read every point; returns (points, runtimes, base readings)."""
    import shutil

    from peft import PeftModel

    from .lib.modeling import free_memory, generation_budget, load_model, load_processor
    from .lib.runtime import measure
    from .lib.training import greedy_readings, run_training

    config = settings["config"]
    processor = load_processor(base_dir, config["image"])
    budget, _ = generation_budget(processor.tokenizer, [r["ocr_text"] for r in train_rows + val_rows], base_dir,
                                  config["instruction"])
    base_readings = greedy_readings(load_model(base_dir), processor, val_rows, config["instruction"], budget)
    points, runtimes = [], []
    for repeat in range(settings["repeats"]):
        subsets = LC.nested_subsets(train_rows, settings["sizes"], settings["seed"] + repeat)
        point_config = {**config, "seed": config["seed"] + repeat}
        done = set()
        for asked, rows in subsets.items():
            if len(rows) in done:  # two sizes rounded up to the same whole documents: one point
                continue
            done.add(len(rows))
            adapter = work_dir / f"r{repeat}_n{len(rows)}"
            reused = train_stage_run(config) if repeat == 0 and rows == train_rows else None
            print(f"learning_curve: repeat {repeat}, {len(rows)} training rows (asked {asked})"
                  + (f": the train stage's adapter ({TRAIN_ADAPTER})" if reused else ""), flush=True)
            with measure() as cost:
                if reused:
                    metrics, adapter = reused, Path(TRAIN_ADAPTER)
                else:
                    metrics = run_training(point_config, base_dir, rows, val_rows, adapter,
                                           checkpoint_dir=work_dir / "checkpoints", measure_cer=False)
                model = PeftModel.from_pretrained(load_model(base_dir), str(adapter))
                readings = greedy_readings(model, processor, val_rows, config["instruction"], budget)
            del model
            if not reused:
                shutil.rmtree(adapter, ignore_errors=True)
            free_memory()
            points.append({"train_rows_asked": asked, "train_rows": len(rows),
                           "documents": len({str(r["image_path"]).rsplit("/", 1)[0] for r in rows}),
                           "repeat": repeat, "seed": point_config["seed"], "readings": readings,
                           "trained_by": "train stage" if reused else "learning_curve",
                           **{k: metrics[k] for k in ("eval_loss", "best_step", "global_step", "trainable_params")}})
            # a reused point cost what the train stage's run cost (its own figures; absent when train ran outside
            # DVC or under torchrun, whose launcher records no training figures), plus this reading
            runtimes.append({"train_rows": len(rows), "repeat": repeat, "trained_by": points[-1]["trained_by"],
                             **{k: metrics.get(k) for k in RUNTIME_KEYS},
                             "point_wall_s": metrics.get("runtime_s") if reused else cost["wall_s"],
                             **({} if reused else {k: cost[k] for k in ("peak_rss_mib", "cuda_max_memory_allocated_mib")})})
    return points, runtimes, base_readings


def train_stage_run(config):
    """The train stage's metrics (with its runtime figures) when its adapter was trained with this config
    (launch keys and trackers aside); None when it is absent or differs (then the point trains here)."""
    from .lib.io import read_json

    if not (Path(TRAIN_ADAPTER, "adapter_config.json").is_file() and Path(TRAIN_METRICS).is_file()):
        return None
    metrics = read_json(TRAIN_METRICS)
    trained = metrics.get("trained_with") if isinstance(metrics, dict) else None
    if not isinstance(trained, dict) or any(trained.get(k) != config[k] for k in (*CURVE_TRAINING_KEYS, "image")
                                             if k != "report_to"):
        return None
    runtime = read_json(TRAIN_RUNTIME) if Path(TRAIN_RUNTIME).is_file() else {}
    return {**metrics, **(runtime if isinstance(runtime, dict) else {})}


def score(points, base_readings, val_rows, settings):
    """Per-point CER and interval, the base's, and the fit; `points` lose their readings."""
    refs = [r["ocr_text"] for r in val_rows]
    resamples, seed = settings["bootstrap_samples"], settings["seed"]
    for p in points:
        p["scores"] = LC.pair_scores(refs, p.pop("readings"))
        p["val_cer"] = float(LC.cer_values(p["scores"]["distance"].sum(), p["scores"]["ref_len"].sum()))
        if resamples:
            p["val_cer_ci95_low"], p["val_cer_ci95_high"] = LC.point_interval(p["scores"], resamples, seed)
    base = LC.pair_scores(refs, base_readings)
    base_block = {"val_cer": float(LC.cer_values(base["distance"].sum(), base["ref_len"].sum()))}
    if resamples:
        base_block["val_cer_ci95_low"], base_block["val_cer_ci95_high"] = LC.point_interval(base, resamples, seed)
    fit = LC.fit_with_interval(points, resamples, seed)
    for p in points:
        del p["scores"]
    return base_block, fit


def curve_csv(points, base):
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["train_rows", "repeat", "val_cer", "val_cer_ci95_low", "val_cer_ci95_high", "base_val_cer"])
    for p in points:
        writer.writerow([p["train_rows"], p["repeat"], p["val_cer"], p.get("val_cer_ci95_low", ""),
                         p.get("val_cer_ci95_high", ""), base["val_cer"]])
    return buf.getvalue()


def plot_curve(points, base, fit, path):
    """CER against training rows (log x): points, interval band, the fit up to its one prediction, the base."""
    fig, ax = new_figure(7, 4.2)
    ordered = sorted(points, key=lambda p: (p["train_rows"], p["repeat"]))
    xs = [p["train_rows"] for p in ordered]
    if all("val_cer_ci95_low" in p for p in ordered):
        means = {}
        for p in ordered:
            means.setdefault(p["train_rows"], []).append((p["val_cer_ci95_low"], p["val_cer_ci95_high"]))
        sizes = sorted(means)
        ax.fill_between(sizes, [min(lo for lo, _ in means[n]) for n in sizes],
                        [max(hi for _, hi in means[n]) for n in sizes], alpha=0.25, label="95% bootstrap interval")
    ax.plot(xs, [p["val_cer"] for p in ordered], "o", label="fine-tuned (each repeat)")
    ax.plot(*zip(*LC.mean_by_size(points)), "-", color="C0")
    ax.axhline(base["val_cer"], color="grey", linestyle="--", label=f"base (no fine-tuning) {base['val_cer']:.3f}")
    if fit:
        grid = [min(xs) * (fit["predict_at_rows"] / min(xs)) ** (i / 50) for i in range(51)]
        ax.plot(grid, [fit["a"] * n ** -fit["b"] for n in grid], ":", color="C1",
                label=f"power-law fit, b = {fit['b']:.2f}")
        lo, hi = fit.get("predicted_val_cer_ci95", (fit["predicted_val_cer"],) * 2)
        ax.errorbar([fit["predict_at_rows"]], [fit["predicted_val_cer"]], fmt="x", color="C1", capsize=4,
                    yerr=[[fit["predicted_val_cer"] - lo], [hi - fit["predicted_val_cer"]]],
                    label=f"if the trend held: {fit['predicted_val_cer']:.3f} at {fit['predict_at_rows']} rows")
    ax.set_xscale("log")
    ax.set_xlabel("training rows (log scale)")
    ax.set_ylabel("validation CER (greedy)")
    ax.set_title("Learning curve: validation CER against training rows")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--non-test", default=NON_TEST)
    parser.add_argument("--base-dir", default="models/base")
    args = parser.parse_args(argv)
    params = P.load_params(PARAMS)
    settings = read_settings(params)
    config = settings["config"]
    if not settings["sizes"]:
        write_skipped("learning_curve.train_rows is empty")
        return
    from .lib.training import choose_backend

    choose_backend(config)
    base_dir = resolve_base_dir(args.base_dir)
    train_rows, val_rows = split_train_val(read_split(args.non_test), config["val_ratio"], config["seed"])
    settings["sizes"], left_out = usable_sizes(settings["sizes"], len(train_rows))
    if not settings["sizes"]:
        write_skipped(f"every size of learning_curve.train_rows is above the {len(train_rows)} training rows")
        return
    started = time.perf_counter()
    work_dir = Path(WORK_DIR)
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / ".gitignore").write_text("*\n")  # never committed; deleted at the end
    points, runtimes, base_readings = run_points(settings, base_dir, train_rows, val_rows, work_dir)
    base, fit = score(points, base_readings, val_rows, settings)
    sentence = LC.reading(points, fit, base["val_cer"])
    with atomic_dir(PLOT_DIR) as plot_dir:
        atomic_write_text(Path(plot_dir) / "learning_curve.csv", curve_csv(points, base))
        plot_curve(points, base, fit, Path(plot_dir) / "learning_curve.png")
    # machine-varying: metrics/runtime/learning_curve.json (run_main writes it under DVC)
    record_runtime(points=runtimes, total_wall_s=round(time.perf_counter() - started, 2))
    atomic_write_json(METRICS, {"skipped": False, "val_rows": len(val_rows), "train_rows_available": len(train_rows),
                                "train_rows_left_out": left_out, "base": base, "points": points, "fit": fit,
                                "summary": sentence})
    import shutil

    shutil.rmtree(work_dir, ignore_errors=True)
    print(sentence)


def write_skipped(why):
    """No point to train: the same outputs, saying so (downstream readers need no special case)."""
    message = f"Learning curve skipped ({why})."
    with atomic_dir(PLOT_DIR) as plot_dir:
        atomic_write_text(Path(plot_dir) / "learning_curve.csv", curve_csv([], {"val_cer": ""}))
        placeholder_figure(Path(plot_dir) / "learning_curve.png", "Learning curve", message)
    record_runtime(points=[], total_wall_s=0)
    atomic_write_json(METRICS, {"skipped": True, "points": [], "summary": message})
    print(f"learning_curve: {message}")


if __name__ == "__main__":
    run_main(main)
