"""search: Optuna hyperparameter search over LoRA training -> models/search/.

    models/base + data/input/ocr_non_test.json + params.yaml `search:` ->
      models/search/study.db          the Optuna study (SQLite, DVC `persist: true`)
      models/search/best_params.json  {"params": searched values of the best trial, "trial", "value",
                                       "objective", "study_name", "timestamp", "skipped", "trials", "adapter"}
      models/search/best_config.json  the complete training config: params.yaml + the best values
      models/search/trials.csv        one row per trial: state, value, params, duration, error
      models/search/trials/trial_N/   result.json and train.log (the trainer's output) for every
                                      trial; adapter/ only for the `search.keep_best_adapters`
                                      best completed trials

Each trial trains like the train stage (same code, stages/lib/training.py) with params.yaml's
training keys, then `search.trial_overrides` (shorter trials: num_train_epochs), then the values
sampled from `search.space`. It reports eval_loss to Optuna at every evaluation (step = the
trainer's global step), so the median pruner stops poor trials; a trial that raises (NaN loss,
out of memory) is recorded FAIL with its error and the study goes on. The objective is the best
eval_loss of the trial (or `val_cer`: greedy CER of its best adapter on the validation rows).

`search.n_trials` is the study's TOTAL: re-running with a higher number continues the same study
(trial numbers go on); `n_trials: 0` skips the search (best_params.json says "skipped": true;
every output is still written, trials/ empty). Without --resume a study that already has trials
is refused.

From search to training, one step: the train stage reads params.yaml only (what `dvc exp show`
lists is what trained). To train with the study's best values, write them into params.yaml:
    python -m stages.search --apply-best      # lora_r, learning_rate, ... <- best_params.json
    git diff params.yaml && dvc repro         # `dvc params diff` shows them; train re-runs
It rewrites only the keys the search covered and keeps params.yaml's comments.
The study outlives code and param changes (DVC re-runs the stage, which then only re-writes the
outputs): to start afresh, change `search.study_name` or delete models/search/study.db. Trials
queued with optuna's `study.enqueue_trial(...)` run first. `search.timeout`: no new trial starts
after it. Space syntax, grid rule, the original JSON config: stages/lib/search/space.py.

Usage (the original's flags work; defaults come from params.yaml):
    dvc repro search                                    # = python -m stages.search --resume
    python -m stages.search --study-name s1 --search-mode random --n-trials 20 --timeout 3600
    python -m stages.search --config configs/search.json --resume    # {"search_space": ..., fixed keys}
Scaling out: `search.workers: N` runs N worker processes here against the same storage (one GPU
each through CUDA_VISIBLE_DEVICES when GPUs exist). Across machines, put the study in PostgreSQL
(the URL only ever comes from the environment, so no password reaches dvc.lock or the outputs):
    export OCR_SEARCH_STORAGE='postgresql+psycopg2://user:pass@dbhost:5432/optuna'
    dvc repro search          # the coordinator: creates the study, runs its trials, writes outputs
and on any other host with a clone, the data and models/base in place, one command joins:
    OCR_SEARCH_STORAGE='postgresql+psycopg2://user:pass@dbhost:5432/optuna' python -m stages.search --worker --study-name ocr-lora --n-trials 5
A worker runs --n-trials trials with the settings the coordinator stored in the study (space,
mode, pruner, objective, fixed training config; only --model-name, --input-data and
--base-output-dir are its own) and keeps its trial folders under its own --base-output-dir. With
external storage the coordinator copies the study into models/search/study.db at the end; trials
still running elsewhere show up in the outputs at the coordinator's next run.
"""
import argparse
import io
import os
import socket
import time
from pathlib import Path

from tqdm import tqdm

from .lib import params as P
from .lib.search import study as S
from .lib.cli import UserError, run_main
from .lib.io import read_split
from .lib.search.space import MODES, PRUNERS, corners, grid_size, parse_space, read_config
from .lib.modeling import IMAGE_PARAMS
from .lib.training import LAUNCH_KEYS, TRAINING_FIELDS, TRAINING_KEYS, demo_value_warnings

OUT_DIR = "models/search"
INPUT = "data/input/ocr_non_test.json"
BEST_PARAMS = f"{OUT_DIR}/best_params.json"
# the fixed training config of every trial, and the search's own. Not num_processes (LAUNCH_KEYS): trials
# run in this process (or in search.workers processes), each single-process, so changing it re-runs train only.
SEARCH_TRAINING_KEYS = [k for k in TRAINING_KEYS if k not in LAUNCH_KEYS]
PARAMS = ["search", *SEARCH_TRAINING_KEYS, IMAGE_PARAMS]


def parse_args(argv, params):
    p = argparse.ArgumentParser(prog="python -m stages.search", description=__doc__.split("\n")[0])
    p.add_argument("--study-name", default=P.get(params, "search.study_name", str), help="default: search.study_name")
    p.add_argument("--search-mode", choices=MODES, default=P.get(params, "search.mode", str, choices=MODES))
    p.add_argument("--n-trials", type=int, default=None, help="the study's total (with --worker: trials to run here)")
    p.add_argument("--timeout", type=float, default=P.get(params, "search.timeout", float, minimum=1, allow_none=True),
                   help="seconds; no new trial starts after it (a running trial finishes)")
    p.add_argument("--resume", action="store_true", help="continue a study that already has trials")
    p.add_argument("--config", help="the original's JSON config: search_space + fixed training keys")
    p.add_argument("--storage", help=f"Optuna storage URL without password (prefer ${S.STORAGE_ENV})")
    p.add_argument("--model-name", help="base model folder (default: models/base)")
    p.add_argument("--input-data", default=INPUT, help="split rows to train/validate on (val_ratio)")
    p.add_argument("--instruction", help="the OCR instruction (default: params.yaml instruction)")
    p.add_argument("--base-output-dir", default=OUT_DIR, help="study.db, best_*.json, trials.csv and trials/")
    p.add_argument("--worker", action="store_true", help="join an existing study and run --n-trials trials")
    p.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--apply-best", action="store_true",
                   help=f"write the best values of {BEST_PARAMS} into params.yaml (then dvc repro trains with them)")
    args = p.parse_args(argv)
    if args.n_trials is None:
        args.n_trials = P.get(params, "search.n_trials", int, minimum=0)
    if args.n_trials < 0:
        raise UserError(f"--n-trials must be >= 0, got {args.n_trials}")
    if args.timeout is not None and args.timeout <= 0:
        raise UserError(f"--timeout must be > 0 seconds, got {args.timeout}")
    return args


def read_settings(params, args):
    """The study's settings from params.yaml's `search:` (+ --config), validated before heavy work."""
    from .lib.training import training_config

    g = lambda key, kind, **kw: P.get(params, f"search.{key}", kind, **kw)  # noqa: E731
    if args.config:
        specs, fixed = read_config(args.config)
    else:
        specs, fixed = parse_space(g("space", dict)), {}
    if args.model_name:
        fixed["model_name"] = args.model_name
    if args.instruction is not None:
        fixed["instruction"] = args.instruction
    for name in list(specs) + list(g("trial_overrides", dict)):
        if name not in TRAINING_KEYS:
            where = "search.space" if name in specs else "search.trial_overrides"
            raise UserError(f"{args.config or 'params.yaml'}: {where}.{name}: not a training parameter "
                            f"(known: {', '.join(TRAINING_KEYS)})")
    for name in [*specs, *g("trial_overrides", dict), *fixed]:
        if name in LAUNCH_KEYS:
            raise UserError(f"{args.config or 'params.yaml'}: search: '{name}' cannot be set for trials (they run "
                            "in one process each; num_processes is the train stage's)")
    fixed = {**fixed, **{key: TRAINING_FIELDS[key].default for key in LAUNCH_KEYS}}   # num_processes 1
    settings = {
        "specs": specs, "mode": args.search_mode,
        "objective": g("objective", str, choices=S.OBJECTIVES),
        "grid_points": g("grid_points", int, minimum=1),
        "keep_best_adapters": g("keep_best_adapters", int, minimum=0),
        "pruner": {"type": g("pruner.type", str, choices=PRUNERS),
                   "n_startup_trials": g("pruner.n_startup_trials", int, minimum=0),
                   "n_warmup_steps": g("pruner.n_warmup_steps", int, minimum=0),
                   "interval_steps": g("pruner.interval_steps", int, minimum=1)},
        "trial_overrides": g("trial_overrides", dict),
        "fixed": training_config(params, overrides=fixed),
    }
    where = f"{args.config}: search_space" if args.config else "search.space"
    for values in [{}] + corners(specs):   # every end and choice of the space must make a valid config
        try:
            S.trial_config(settings, values)
        except UserError as err:
            what = "search.trial_overrides" if not values else f"{where}.{next(iter(values))}={next(iter(values.values()))!r}"
            raise UserError(f"{what}: invalid training config ({err})") from None
    return settings


def load_data(args, val_ratio, seed):
    from .lib.modeling import check_model_dir, resolve_base_dir
    from .lib.training import split_train_val

    base_dir = check_model_dir(args.model_name, "--model-name") if args.model_name else resolve_base_dir()
    train_rows, val_rows = split_train_val(read_split(args.input_data), val_ratio, seed)
    return base_dir, train_rows, val_rows


def worker_seed(seed, index, existing):
    return None if index is None else seed + 1_000_003 * index + 7919 * existing


def join(args, params):
    """--worker: run trials of an existing study with the settings stored in it."""
    url = S.storage_url(args.base_output_dir, args.storage)
    study = S.load_worker_study(S.open_storage(url), args.study_name)
    settings = study.user_attrs[S.SETTINGS_ATTR]
    base_dir, train_rows, val_rows = load_data(args, settings["fixed"]["val_ratio"], settings["fixed"]["seed"])
    name = f"w{args.worker_index}" if args.worker_index is not None else f"{socket.gethostname()}:{os.getpid()}"
    S.run_worker(study, settings, n_trials=args.n_trials, timeout=args.timeout,
                 seed=worker_seed(P.get(params, "search.seed", int), args.worker_index, len(study.trials)),
                 base_dir=base_dir, train_rows=train_rows, val_rows=val_rows,
                 trials_dir=Path(args.base_output_dir) / "trials", worker=name)


def yaml_float(value):
    """repr(value), written so that every YAML 1.1 reader takes it for a float (2.0e-04, not 2e-04)."""
    text = repr(float(value))
    if "e" in text and "." not in text.split("e")[0]:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}.0e{exponent}"
    return text


def apply_best(best_path=BEST_PARAMS, params_path=P.PARAMS_FILE):
    """Write the study's best values into params.yaml (comments and order kept); print what changed."""
    from ruamel.yaml import YAML

    from .lib.io import atomic_write_text, read_json
    from .lib.training import training_config

    best = read_json(best_path)
    if not isinstance(best, dict) or not isinstance(best.get("params"), dict):
        raise UserError(f"{best_path}: expected the search's best_params.json (run `dvc repro search`)")
    if best.get("skipped") or not best["params"]:
        raise UserError(f"{best_path}: the search was skipped (search.n_trials 0): no values to apply")
    yaml = YAML()   # round-trip: the file keeps its comments, order and quoting
    yaml.preserve_quotes = True
    yaml.width = 4096   # no re-wrapping of long lines
    yaml.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    # a float with a dot and an exponent: PyYAML (our reader) takes 1e-05 for a string
    yaml.representer.add_representer(float, lambda r, v: r.represent_scalar("tag:yaml.org,2002:float", yaml_float(v)))
    with open(params_path, encoding="utf-8") as f:
        doc = yaml.load(f)
    training_config({**doc, **best["params"]})   # the result must be a valid config before anything is written
    changes = [(k, doc.get(k), v) for k, v in best["params"].items() if doc.get(k) != v]
    for key, _, value in changes:
        doc[key] = value
    buffer = io.StringIO()
    yaml.dump(doc, buffer)
    atomic_write_text(params_path, buffer.getvalue())
    what = ", ".join(f"{k} {old!r} -> {new!r}" for k, old, new in changes) or "no change: params.yaml has them"
    S.say(f"best trial {best['trial']} of study '{best['study_name']}' ({best['objective']} {best['value']:.4f}): "
          f"{what} in {params_path}; `dvc repro` trains with them")


def main(argv=None):
    params = P.load_params(PARAMS)
    args = parse_args(argv, params)
    if args.apply_best:
        return apply_best(Path(args.base_output_dir) / "best_params.json")
    if args.worker:
        return join(args, params)
    started = time.monotonic()
    settings = read_settings(params, args)
    for warning in demo_value_warnings(settings["fixed"], settings["specs"]):
        S.say(warning)
    workers = P.get(params, "search.workers", int, minimum=1)
    seed = P.get(params, "search.seed", int)
    out_dir = Path(args.base_output_dir)
    if args.n_trials > 0:
        base_dir, train_rows, val_rows = load_data(args, settings["fixed"]["val_ratio"], settings["fixed"]["seed"])
    url = S.storage_url(out_dir, args.storage)
    storage = S.open_storage(url)
    (out_dir / "trials").mkdir(parents=True, exist_ok=True)   # a DVC out: it must exist even when no trial runs
    study = S.prepare_study(storage, args.study_name, settings, args.resume)
    existing = sum(t.state.name != "WAITING" for t in study.trials)   # enqueued trials run first
    remaining = max(0, args.n_trials - existing)
    grid = f", grid of {grid_size(settings['specs'], settings['grid_points'])}" if args.search_mode == "grid" else ""
    S.say(f"study '{args.study_name}' in {S.safe_url(url)}: {existing} trials so far, {remaining} to run "
          f"({args.search_mode}{grid}, objective {settings['objective']}, {workers} worker(s))")
    if remaining:
        with tqdm(total=remaining, desc="search", unit="trial") as bar:
            if workers == 1:
                S.run_worker(study, settings, n_trials=remaining, timeout=args.timeout,
                             seed=worker_seed(seed, 0, existing), base_dir=base_dir, train_rows=train_rows,
                             val_rows=val_rows, trials_dir=out_dir / "trials", worker="w0", bar=bar)
            else:
                worker_args = ["--study-name", args.study_name, "--base-output-dir", str(out_dir),
                               "--input-data", args.input_data]
                worker_args += ["--model-name", args.model_name] if args.model_name else []
                worker_args += ["--timeout", str(args.timeout)] if args.timeout else []
                S.spawn_workers(url, worker_args, S.split_evenly(remaining, workers), bar, study)
    if not S.is_local_sqlite(url, out_dir):
        S.snapshot_to_sqlite(args.study_name, storage, out_dir / "study.db")
    info = S.write_outputs(study, settings, out_dir, skipped=args.n_trials == 0)
    t = info["trials"]
    best = "search skipped (n_trials 0)" if info["skipped"] else \
        (f"best trial {info['trial']}: {info['objective']} {info['value']:.4f} {info['params']} "
         "(train uses params.yaml; `python -m stages.search --apply-best` writes these there)")
    S.say(f"{t['complete']} complete, {t['pruned']} pruned, {t['failed']} failed; {best} "
          f"[{time.monotonic() - started:.0f}s] -> {out_dir}/best_params.json")


if __name__ == "__main__":
    run_main(main)
