"""The Optuna side of the search stage: storage, the study, one trial, workers, the outputs.

Storage: $OCR_SEARCH_STORAGE (e.g. postgresql+psycopg2://user:pass@host/db) if set, else the
--storage flag (refused when it holds a password), else SQLite at <out>/study.db (60 s busy
timeout, so worker processes on one machine share it). Heartbeats mark trials of killed workers
FAIL. The coordinator creates the study and stores its settings (space, objective, mode, pruner,
fixed training config, trial overrides) as study user attrs; every worker, local or on another
host, runs trials from those stored settings, so all trials of a study are comparable.
"""
import csv
import math
import os
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from datetime import timezone
from pathlib import Path

from ..cli import UserError, record_runtime
from ..io import atomic_write_json, atomic_write_text
from .space import make_pruner, make_sampler, suggest

STORAGE_ENV = "OCR_SEARCH_STORAGE"
SETTINGS_ATTR = "ocr_search"          # the study user attr holding the settings
OBJECTIVES = ("eval_loss", "val_cer")
FINISHED = ("COMPLETE", "PRUNED", "FAIL")


def say(line):
    from tqdm import tqdm

    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()


# ---------------------------------------------------------------- storage

def _credentials(url):
    """(scheme, user:password, rest) of scheme://user:password@host/db. The credentials end at the
    LAST '@' (a password may hold '@', ':' or '/'; a parser that stops at the first '@' shows the
    rest of the password as the host)."""
    scheme, sep, rest = str(url).partition("://")
    if not sep or "@" not in rest:
        return scheme, None, rest
    creds, _, host = rest.rpartition("@")
    return scheme, creds, host


def safe_url(url):
    """The URL with its password hidden (for messages): scheme://user:***@host/db."""
    scheme, creds, rest = _credentials(url)
    if creds is None:
        return str(url) if "://" in str(url) else "<unparseable storage URL>"
    return f"{scheme}://{creds.split(':', 1)[0]}:***@{rest}"


def _password(url):
    _, creds, _ = _credentials(url)
    return creds.split(":", 1)[1] if creds and ":" in creds else ""


def check_url_password(url, where):
    """A raw '@' in the password: the URL parser would cut the password there and hand its tail to the
    driver as a host name (which the driver then prints). One line, showing nothing of it."""
    if "@" in _password(url):
        raise UserError(f"{where}: the password holds '@'; write it URL-encoded (%40) in {safe_url(url)}")


def scrub(text, url):
    """A driver's message with the URL's password hidden."""
    password = _password(url)
    return text.replace(password, "***") if password else text


def default_storage(out_dir):
    return f"sqlite:///{Path(out_dir) / 'study.db'}"


def storage_url(out_dir, cli_storage=None):
    """The study's storage URL. The environment variable wins; a flag may not hold a password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    env = os.environ.get(STORAGE_ENV, "").strip()
    if env:
        check_url_password(env, f"${STORAGE_ENV}")
        return env
    if cli_storage:
        try:
            if make_url(cli_storage).password:
                raise UserError(f"--storage: the URL holds a password; set it in ${STORAGE_ENV} instead "
                                "(flags end up in shell history and dvc.yaml)")
        except ArgumentError:
            raise UserError(f"--storage: {cli_storage!r} is not a database URL (e.g. sqlite:///path/study.db)") from None
        return cli_storage
    return default_storage(out_dir)


def is_local_sqlite(url, out_dir):
    return url == default_storage(out_dir)


def open_storage(url):
    """An RDBStorage with heartbeats; connection problems become one-line UserErrors."""
    import warnings

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    kwargs = {}
    if url.startswith("sqlite:///"):
        Path(url[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    else:
        kwargs["engine_kwargs"] = {"pool_pre_ping": True}
    try:
        return optuna.storages.RDBStorage(url, heartbeat_interval=30, grace_period=120, **kwargs)
    except ImportError as err:
        raise UserError(f"storage {safe_url(url)}: driver missing ({scrub(str(err), url)}); use postgresql+psycopg2://...") from None
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"storage {safe_url(url)}: cannot open ({scrub(reason, url)})") from None


# ---------------------------------------------------------------- the study

def prepare_study(storage, name, settings, resume):
    """Create the study, or continue it (resume), and store this run's settings in it."""
    import optuna

    names = [s.study_name for s in optuna.study.get_all_study_summaries(storage, include_best_trial=False)]
    if name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        if study.trials and not resume:
            raise UserError(f"study '{name}' already has {len(study.trials)} trials in this storage; pass --resume "
                            "to continue it or choose another --study-name / search.study_name")
        if study.direction != optuna.study.StudyDirection.MINIMIZE:
            raise UserError(f"study '{name}' was created to maximize; use another study name")
        old = study.user_attrs.get(SETTINGS_ATTR)
        if old and old["objective"] != settings["objective"] and study.trials:
            raise UserError(f"search.objective: study '{name}' holds {old['objective']} values, not "
                            f"{settings['objective']}; use another study_name to change the objective")
        if old:
            changed = sorted(k for k in set(old["fixed"]) | set(settings["fixed"])
                             if old["fixed"].get(k) != settings["fixed"].get(k))
            changed += [k for k in ("specs", "trial_overrides") if old.get(k) != settings[k]]
            if changed and study.trials:
                say(f"note: study '{name}' continues with changed settings ({', '.join(changed)}); "
                    "earlier trials ran with the old ones")
    else:
        study = optuna.create_study(study_name=name, storage=storage, direction="minimize")
    study.set_user_attr(SETTINGS_ATTR, settings)
    return study


def load_worker_study(storage, name):
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise UserError(f"study '{name}' not found in the storage: start the coordinator "
                        "(dvc repro search / python -m stages.search --resume) first, it creates the study") from None
    if SETTINGS_ATTR not in study.user_attrs:
        raise UserError(f"study '{name}' was not created by stages.search (no settings stored)")
    return study


def counts(study):
    out = {"COMPLETE": 0, "PRUNED": 0, "FAIL": 0, "RUNNING": 0, "WAITING": 0}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


# ---------------------------------------------------------------- one trial

def report_callback(trial):
    """A TrainerCallback: report eval_loss at every evaluation (step = global step); prune; NaN fails."""
    import optuna
    from transformers import TrainerCallback

    class ReportToOptuna(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            loss = (logs or {}).get("loss")
            if loss is not None and not math.isfinite(loss):
                raise FloatingPointError(f"train loss is {loss} at step {state.global_step}")

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            value = (metrics or {}).get("eval_loss")
            if value is None:
                return
            if not math.isfinite(value):
                raise FloatingPointError(f"eval_loss is {value} at step {state.global_step}")
            trial.report(value, state.global_step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"eval_loss {value:.4f} at step {state.global_step}")

    return ReportToOptuna()


def trial_config(settings, values):
    """fixed config <- report_to none <- trial overrides <- searched values, validated."""
    from ..training import training_config

    merged = {**settings["fixed"], "report_to": "none", **settings["trial_overrides"], **values}
    return training_config(merged)


def make_objective(settings, base_dir, train_rows, val_rows, trials_dir, worker):
    from ..training import choose_backend, import_unsloth_first, run_training

    import_unsloth_first(choose_backend(settings["fixed"]))  # before report_callback imports transformers

    def objective(trial):
        trial.set_user_attr("worker", worker)
        values = suggest(trial, settings["specs"])
        trial_dir = Path(trials_dir) / f"trial_{trial.number}"
        adapter = trial_dir / "adapter"
        try:
            config = trial_config(settings, values)
            trial_dir.mkdir(parents=True, exist_ok=True)
            with open(trial_dir / "train.log", "w", encoding="utf-8") as log, redirect_stdout(log), redirect_stderr(log):
                metrics = run_training(config, base_dir, train_rows, val_rows, adapter,
                                       callbacks=[report_callback(trial)], checkpoint_dir=trial_dir / "checkpoints",
                                       measure_cer=settings["objective"] == "val_cer")
            for key, value in metrics.items():
                if isinstance(value, (int, float, str, bool)) or value is None:
                    trial.set_user_attr(key, value)
            value = metrics["val_cer" if settings["objective"] == "val_cer" else "best_eval_loss"]
            if value is None or not math.isfinite(value):
                raise FloatingPointError(f"{settings['objective']} is {value}")
            return float(value)
        except Exception as err:
            import optuna

            shutil.rmtree(adapter, ignore_errors=True)
            if not isinstance(err, optuna.TrialPruned):
                message = str(err).strip().splitlines()[0] if str(err).strip() else ""
                trial.set_user_attr("error", f"{type(err).__name__}: {message}"[:500])
                trial.set_user_attr("traceback", traceback.format_exc()[-4000:])
            raise
        finally:
            shutil.rmtree(trial_dir / "checkpoints", ignore_errors=True)
            from ..modeling import free_memory

            free_memory()

    return objective


def trial_record(t):
    duration = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
    return {"trial": t.number, "state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
            "params": t.params,
            "duration_s": round(duration, 2) if duration is not None else None,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())},
            "started": t.datetime_start.isoformat(timespec="seconds") if t.datetime_start else None,
            "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "traceback"}}


TRIAL_COST = ("samples_per_second", "peak_rss_mib", "cuda_max_memory_allocated_mib", "device")


def trial_cost(t):
    """What a trial cost on this machine (its wall time; for a completed one, run_training's figures)."""
    return {"duration_s": trial_record(t)["duration_s"], **{k: t.user_attrs.get(k) for k in TRIAL_COST}}


def trial_line(t, objective):
    r = trial_record(t)
    params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in t.params.items())
    if t.state.name == "COMPLETE":
        outcome = f"{objective} {t.value:.4f}"
    elif t.state.name == "PRUNED":
        last = max(t.intermediate_values) if t.intermediate_values else None
        outcome = f"pruned at step {last}" + (f" (eval_loss {t.intermediate_values[last]:.4f})" if last is not None else "")
    else:
        outcome = f"FAILED: {t.user_attrs.get('error', 'see the log')}"
    return f"trial {t.number:3d} [{t.user_attrs.get('worker', '?')}] {params} -> {outcome} ({r['duration_s']:.1f}s)"


def keep_best_adapters(study, trials_dir, keep):
    """Delete adapters of finished trials outside the `keep` best completed ones."""
    done = sorted((t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"), key=lambda t: t.value)
    best = {t.number for t in done[:keep]}
    finished = {t.number for t in study.get_trials(deepcopy=False) if t.state.name in FINISHED}
    for number in finished - best:
        shutil.rmtree(Path(trials_dir) / f"trial_{number}" / "adapter", ignore_errors=True)


def run_worker(study, settings, *, n_trials, timeout, seed, base_dir, train_rows, val_rows, trials_dir,
               worker, bar=None):
    """Run up to n_trials trials of `study` in this process, a line per trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study.sampler = make_sampler(settings["mode"], settings["specs"], seed, settings["grid_points"])
    study.pruner = make_pruner(settings["pruner"])

    def after_trial(study, t):
        atomic_write_json(Path(trials_dir) / f"trial_{t.number}" / "result.json", trial_record(t))
        keep_best_adapters(study, trials_dir, settings["keep_best_adapters"])
        say(trial_line(t, settings["objective"]))
        if bar is not None:
            bar.update(1)

    objective = make_objective(settings, base_dir, train_rows, val_rows, trials_dir, worker)
    study.optimize(objective, n_trials=n_trials, timeout=timeout, catch=(Exception,), callbacks=[after_trial])


# ---------------------------------------------------------------- workers on this machine

def gpu_ids():
    """GPUs to hand out one per worker: CUDA_VISIBLE_DEVICES if set, else every visible device."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "-1"]
    if not shutil.which("nvidia-smi"):   # no driver: no need to import torch to find out
        return []
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def split_evenly(total, parts):
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def spawn_workers(url, worker_args, shares, bar, study):
    """Start one `python -m stages.search --worker` per share; update the bar from the storage."""
    gpus = gpu_ids()
    threads = max(1, (os.cpu_count() or 1) // len(shares))
    start = sum(counts(study)[s] for s in FINISHED)
    procs = []
    for index, share in enumerate(shares):
        if share == 0:
            continue
        env = dict(os.environ, **{STORAGE_ENV: url})
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        else:
            env.setdefault("OMP_NUM_THREADS", str(threads))
        cmd = [sys.executable, "-m", "stages.search", "--worker", "--worker-index", str(index + 1),
               "--n-trials", str(share), *worker_args]
        procs.append(subprocess.Popen(cmd, env=env))
    while any(p.poll() is None for p in procs):
        time.sleep(2)
        if bar is not None:
            bar.n = sum(counts(study)[s] for s in FINISHED) - start
            bar.refresh()
    bad = [p.returncode for p in procs if p.returncode != 0]
    if bad:
        raise UserError(f"search.workers: {len(bad)} worker process(es) exited with {bad} (see their messages above)")


# ---------------------------------------------------------------- outputs

def write_trials_csv(study, path, space_names):
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    # quality and config only: what a trial cost on this machine goes to metrics/runtime/search.json
    writer.writerow(["trial", "state", "value", *space_names, "best_step", "last_step", "worker", "error",
                     "trainable_params"])
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        writer.writerow([t.number, t.state.name, t.value if t.state.name == "COMPLETE" else "",
                         *[t.params.get(n, "") for n in space_names],
                         t.user_attrs.get("best_step", ""),
                         max(t.intermediate_values) if t.intermediate_values else "",
                         t.user_attrs.get("worker", ""), t.user_attrs.get("error", ""),
                         t.user_attrs.get("trainable_params", "")])
    atomic_write_text(path, buf.getvalue())


def snapshot_to_sqlite(study_name, from_storage, sqlite_path):
    """Copy a study from remote storage into the local study.db (replacing an older copy)."""
    import optuna

    sqlite_path = Path(sqlite_path)
    sqlite_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = sqlite_path.with_name(f".{sqlite_path.name}.tmp")
    tmp.unlink(missing_ok=True)
    optuna.copy_study(from_study_name=study_name, from_storage=from_storage, to_storage=f"sqlite:///{tmp}")
    os.replace(tmp, sqlite_path)


def last_finished(study):
    """When the study's last trial finished (UTC, ISO 8601), or None. Not the time of writing: a
    re-run that adds no trial then writes the same best_params.json, and DVC does not re-train."""
    times = [t.datetime_complete for t in study.get_trials(deepcopy=False) if t.datetime_complete]
    return max(times).astimezone(timezone.utc).isoformat(timespec="seconds") if times else None


def write_outputs(study, settings, out_dir, *, skipped):
    """best_params.json, best_config.json (the complete training config) and trials.csv."""
    from ..training import training_config

    out_dir = Path(out_dir)
    names = list(settings["specs"])
    write_trials_csv(study, out_dir / "trials.csv", names)
    c = counts(study)
    info = {"params": {}, "trial": None, "value": None, "objective": settings["objective"],
            "study_name": study.study_name, "skipped": skipped,
            "trials": {"complete": c["COMPLETE"], "pruned": c["PRUNED"], "failed": c["FAIL"]},
            "adapter": None}
    if not skipped:
        if c["COMPLETE"] == 0:
            raise UserError(f"study '{study.study_name}': no trial completed ({c['PRUNED']} pruned, {c['FAIL']} failed; "
                            f"errors in {out_dir / 'trials.csv'})")
        best = study.best_trial
        adapter = out_dir / "trials" / f"trial_{best.number}" / "adapter"
        info.update(params=best.params, trial=best.number, value=best.value,
                    adapter=str(adapter) if adapter.is_dir() else None)
    config = training_config(settings["fixed"], overrides=info["params"])
    atomic_write_json(out_dir / "best_config.json", config)
    atomic_write_json(out_dir / "best_params.json", info)
    # times vary by machine: metrics/runtime/search.json, not the files above (a re-run elsewhere
    # that finds the same trials leaves them byte for byte)
    record_runtime(last_trial_finished=last_finished(study),
                   trials={t.number: trial_cost(t) for t in study.get_trials(deepcopy=False)})
    return info
