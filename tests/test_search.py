"""The search stage: space parsing and the grid rule, the original's JSON config, bad input, and real
studies on the tiny model (a pruned trial, a NaN trial recorded FAIL, skip, resume with two local
workers on SQLite) and two worker processes plus a joining worker on a real PostgreSQL server."""
import csv
import json
import os
import pwd
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
from datetime import timezone
from pathlib import Path

import pytest
import yaml

from stages.lib.search import space as SP
from stages.lib.cli import UserError, recorded_runtime, run_main

ROOT = Path(__file__).resolve().parents[1]
PASSWORD = "pw-Zq81-secret"


# ---------------------------------------------------------------- space, grid rule, JSON config

def test_space_types_and_grid_rule():
    specs = SP.parse_space({
        "learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
        "warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.2},
        "num_train_epochs": {"type": "int", "low": 2, "high": 10, "step": 2},
        "lora_r": {"type": "categorical", "choices": [8, 16, 32]},
        "lora_alpha": {"type": "int", "low": 1, "high": 100},
        "weight_decay": {"type": "uniform", "low": 0.0, "high": 0.1, "values": [0.0, 0.05]},
    })
    grid = SP.grid(specs, 3)
    assert grid["learning_rate"] == [1.0e-4, 1.0e-3, 1.0e-2]          # log-spaced, both ends
    assert grid["warmup_ratio"] == [0.0, 0.1, 0.2]                     # evenly spaced
    assert grid["num_train_epochs"] == [2, 6, 10]                      # 5 steps > 3 points: spread
    assert SP.grid_values(specs["num_train_epochs"], 5) == [2, 4, 6, 8, 10]
    assert grid["lora_r"] == [8, 16, 32]
    assert grid["lora_alpha"] == [1, 51, 100]                     # 1 + round(99 / 2)
    assert grid["weight_decay"] == [0.0, 0.05]                         # explicit values win
    assert SP.grid_size(specs, 3) == 3 * 3 * 3 * 3 * 3 * 2
    assert all(SP.contains(specs[name], v) for name, values in grid.items() for v in values)


def test_samplers_follow_the_space():
    """grid visits every grid point once then stops; random/TPE stay inside the space."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    specs = SP.parse_space({"learning_rate": {"type": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
                            "lora_r": {"type": "categorical", "choices": [8, 16]}})
    study = optuna.create_study(sampler=SP.make_sampler("grid", specs, seed=0, grid_points=3))
    study.optimize(lambda t: sum(v for v in SP.suggest(t, specs).values()), n_trials=20)
    seen = sorted((t.params["learning_rate"], t.params["lora_r"]) for t in study.trials)
    assert seen == sorted((lr, r) for lr in (1.0e-4, 1.0e-3, 1.0e-2) for r in (8, 16))   # 6 points, then stop
    for mode in ("random", "bayesian"):
        study = optuna.create_study(sampler=SP.make_sampler(mode, specs, seed=0))
        study.optimize(lambda t: SP.suggest(t, specs)["learning_rate"], n_trials=12)
        assert all(SP.contains(specs[k], v) for t in study.trials for k, v in t.params.items())
        assert len({t.params["learning_rate"] for t in study.trials}) == 12


@pytest.mark.parametrize("space, message", [
    ({"lr": {"type": "normal", "low": 1, "high": 2}}, "search.space.lr.type must be one of"),
    ({"lr": {"type": "loguniform", "low": 0.0, "high": 1.0}}, "search.space.lr.low must be > 0"),
    ({"lr": {"type": "uniform", "low": "1e-3", "high": 1.0}}, "search.space.lr.low must be a number, got '1e-3' (write floats like 2.0e-4"),
    ({"lr": {"type": "uniform", "low": 2.0, "high": 1.0}}, "search.space.lr: low 2.0 is above high 1.0"),
    ({"r": {"type": "int", "low": 1.5, "high": 4}}, "search.space.r.low must be an integer"),
    ({"r": {"type": "int", "low": 1, "high": 4, "step": 0}}, "search.space.r.step must be >= 1"),
    ({"r": {"type": "categorical", "choices": []}}, "search.space.r.choices must be a non-empty list"),
    ({"r": {"type": "categorical", "choices": [8], "low": 1}}, "search.space.r: unknown field 'low'"),
    ({"r": {"type": "int", "low": 1, "high": 4, "values": [5]}}, "search.space.r.values: 5 is outside"),
    ({"r": [8, 16]}, "search.space.r: expected a mapping"),
])
def test_space_errors_name_the_parameter(space, message):
    with pytest.raises(UserError) as err:
        SP.parse_space(space)
    assert message in str(err.value)


def test_original_json_config(tmp_path):
    """The original's config file: search_space + fixed keys; its split strings become val_ratio."""
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "search_space": {"learning_rate": {"type": "loguniform", "low": 1e-5, "high": 5e-4},
                         "num_train_epochs": {"type": "int", "low": 2, "high": 5, "step": 1},
                         "lora_r": {"type": "categorical", "choices": [8, 16, 32, 64]},
                         "warmup_ratio": {"type": "uniform", "low": 0.0, "high": 0.15}},
        "train_split": "train[:90%]", "val_split": "train[90%:]", "max_seq_length": 8192,
        "load_in_4bit": True, "per_device_train_batch_size": 1, "gradient_accumulation_steps": 4}))
    specs, fixed = SP.read_config(path)
    assert specs["num_train_epochs"] == {"type": "int", "low": 2, "high": 5, "step": 1}
    assert specs["learning_rate"]["low"] == 1e-5 and specs["lora_r"]["choices"] == [8, 16, 32, 64]
    assert fixed == {"max_seq_length": 8192, "load_in_4bit": True, "per_device_train_batch_size": 1,
                     "gradient_accumulation_steps": 4, "val_ratio": 0.1}
    path.write_text(json.dumps({"search_space": {}, "train_split": "train[:80%]", "val_split": "train[90%:]"}))
    with pytest.raises(UserError, match="train_split and val_split disagree"):
        SP.read_config(path)


# ---------------------------------------------------------------- a project folder for the stage

def make_project(folder, base_dir, rows_file, search=None, top=None):
    """params.yaml for fast tiny trials (18 training rows, batch 9: 2 steps an epoch; eval every 2 steps)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(per_device_train_batch_size=9, warmup_ratio=0.0, eval_steps=2, logging_steps=1,
                  val_ratio=0.25, num_train_epochs=3.0, **(top or {}))
    s = params["search"]
    s.update(n_trials=3, keep_best_adapters=1, workers=1, timeout=None)
    s["pruner"].update(type="median", n_startup_trials=1, n_warmup_steps=0)
    s["space"] = {"learning_rate": {"type": "loguniform", "low": 1.0e-7, "high": 1.0e5}}
    s["trial_overrides"] = {"num_train_epochs": 2}
    for key, value in (search or {}).items():
        s[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    return ["--model-name", str(base_dir), "--input-data", str(rows_file)]


def run_stage(argv, capsys):
    """run_main in-process: (exit code, stdout, stderr)."""
    from stages.search import main

    code = 0
    try:
        run_main(main, argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_base_dir, tiny_rows_file):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", str(ROOT))          # spawned workers: python -m stages.search
    monkeypatch.delenv("OCR_SEARCH_STORAGE", raising=False)
    return lambda **kw: make_project(tmp_path, tiny_base_dir, tiny_rows_file, **kw)


@pytest.mark.parametrize("search, top, extra, message", [
    ({"mode": "annealing"}, {}, [], "'search.mode' must be one of"),
    ({"space": {"lora_r": {"type": "categorical", "choices": [0, 8]}}}, {}, [],
     "search.space.lora_r=0: invalid training config (params.yaml: 'lora_r' must be >= 1"),
    ({"space": {"lora_rank": {"type": "int", "low": 4, "high": 8}}}, {}, [], "search.space.lora_rank: not a training parameter"),
    ({"trial_overrides": {"num_train_epochs": -1}}, {}, [], "search.trial_overrides: invalid training config"),
    ({"trial_overrides": {"num_processes": 2}}, {}, [], "search: 'num_processes' cannot be set for trials"),
    ({"objective": "f1"}, {}, [], "'search.objective' must be one of"),
    ({}, {}, ["--storage", "postgresql+psycopg2://u:hunter2@db/x"], "the URL holds a password; set it in $OCR_SEARCH_STORAGE"),
    ({}, {}, ["--n-trials", "-1"], "--n-trials must be >= 0"),
])
def test_bad_input_one_line_nothing_written(project, capsys, search, top, extra, message):
    argv = project(search=search, top=top) + extra
    code, out, err = run_stage(argv, capsys)
    assert code == 2
    assert err.strip().startswith("error: ") and message in err and len(err.strip().splitlines()) == 1, err
    assert "hunter2" not in err
    assert not Path("models").exists()


# ---------------------------------------------------------------- real studies on the tiny model

def load_study(url="sqlite:///models/search/study.db", name="ocr-lora"):
    import optuna

    return optuna.load_study(study_name=name, storage=url)


def test_prune_fail_skip_resume_with_workers(project, capsys):
    """n_trials 0 skips; then a complete, a pruned and a NaN (FAIL) trial; then two local worker
    processes on SQLite continue the same study (trial numbers go on)."""
    args = project(search={"n_trials": 0})
    code, out, err = run_stage(args + ["--resume"], capsys)
    assert code == 0, err
    skipped = json.loads(Path("models/search/best_params.json").read_text())
    assert skipped["skipped"] is True and skipped["params"] == {} and skipped["trial"] is None
    # never an empty folder: DVC would warn "'models/search/trials' is empty" on every skipped search
    assert [p.name for p in Path("models/search/trials").iterdir()] == ["README.txt"]
    config = json.loads(Path("models/search/best_config.json").read_text())
    assert config["learning_rate"] == yaml.safe_load(Path("params.yaml").read_text())["learning_rate"]

    # The first trial trains well; the second barely learns (pruned against the first at the
    # same step); the third diverges to a NaN eval_loss. Enqueued, so the test is deterministic.
    study = load_study()
    for lr in (5.0e-3, 1.0e-7, 1.0e5):
        study.enqueue_trial({"learning_rate": lr})
    project(search={"n_trials": 3})
    code, out, err = run_stage(args + ["--resume"], capsys)
    assert code == 0, err
    states = [t.state.name for t in load_study().trials]
    assert states == ["COMPLETE", "PRUNED", "FAIL"], out
    t0, t1, t2 = load_study().trials
    assert list(t0.intermediate_values) == [2, 4] and t0.value == min(t0.intermediate_values.values())
    assert list(t1.intermediate_values) == [2]                          # stopped at its first report
    assert t1.intermediate_values[2] > t0.intermediate_values[2]
    assert "nan" in t2.user_attrs["error"].lower() and "Traceback" in t2.user_attrs["traceback"]
    assert "trial   1 [w0] learning_rate=1e-07 -> pruned at step 2" in out
    assert "trial   2 [w0] learning_rate=1e+05 -> FAILED: FloatingPointError" in out
    assert "1 complete, 1 pruned, 1 failed; best trial 0" in out

    best = json.loads(Path("models/search/best_params.json").read_text())
    assert best["params"] == {"learning_rate": 5.0e-3} and best["trial"] == 0 and best["skipped"] is False
    assert best["value"] == pytest.approx(t0.value) and best["objective"] == "eval_loss"
    # times vary by machine: metrics/runtime/search.json (written by run_main under DVC), not these files
    assert "timestamp" not in best and "duration_s" not in Path("models/search/trials.csv").read_text()
    runtime = recorded_runtime()
    assert runtime["last_trial_finished"] == t2.datetime_complete.astimezone(timezone.utc).isoformat(timespec="seconds")
    assert set(runtime["trials"]) == {0, 1, 2} and runtime["trials"][2]["peak_rss_mib"] is None
    assert runtime["trials"][0]["peak_rss_mib"] > 0 and runtime["trials"][0]["samples_per_second"] > 0   # what it cost
    assert runtime["trials"][0]["device"] and runtime["trials"][0]["duration_s"] > 0
    # A re-run that adds no trial rewrites best_params.json byte for byte (train does not re-run).
    before = Path("models/search/best_params.json").read_bytes()
    code, out, err = run_stage(args + ["--resume"], capsys)
    assert code == 0, err
    assert Path("models/search/best_params.json").read_bytes() == before
    config = json.loads(Path("models/search/best_config.json").read_text())
    assert config["learning_rate"] == 5.0e-3 and config["num_train_epochs"] == 3.0   # params.yaml, not the trial's 2
    assert config["lora_r"] == 16 and config["report_to"] == "none"
    rows = list(csv.DictReader(open("models/search/trials.csv", encoding="utf-8")))
    assert [(r["trial"], r["state"]) for r in rows] == [("0", "COMPLETE"), ("1", "PRUNED"), ("2", "FAIL")]
    assert rows[2]["error"].startswith("FloatingPointError") and rows[1]["value"] == ""
    assert int(rows[0]["trainable_params"]) > 0 and "peak_rss_mib" not in rows[0]   # cost: metrics/runtime only
    trials = Path("models/search/trials")
    for n, state in enumerate(states):
        assert json.loads((trials / f"trial_{n}" / "result.json").read_text())["state"] == state
        assert (trials / f"trial_{n}" / "adapter").is_dir() == (n == 0)  # only the best adapter is kept
        assert not (trials / f"trial_{n}" / "checkpoints").exists()
    assert (trials / "trial_0" / "adapter" / "adapter_config.json").is_file()

    # Without --resume an existing study is refused; with it and a higher n_trials it continues,
    # here with two worker processes sharing the SQLite file.
    code, out, err = run_stage(args + ["--n-trials", "5"], capsys)
    assert code == 2 and "pass --resume" in err
    project(search={"n_trials": 5, "workers": 2, "trial_overrides": {"num_train_epochs": 1}})
    code, out, err = run_stage(args + ["--resume"], capsys)
    assert code == 0, err
    trials_after = load_study().trials
    assert [t.number for t in trials_after] == [0, 1, 2, 3, 4]
    assert all(t.state.name in ("COMPLETE", "PRUNED", "FAIL") for t in trials_after)
    assert sorted(t.user_attrs["worker"] for t in trials_after[3:]) == ["w1", "w2"]
    assert len(list(csv.DictReader(open("models/search/trials.csv", encoding="utf-8")))) == 5
    assert sum(1 for p in trials.glob("trial_*/adapter") if p.is_dir()) == 1


# ---------------------------------------------------------------- PostgreSQL: workers on one study

def find_pg_bin():
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="module")
def postgres_url():
    """A throw-away PostgreSQL server on 127.0.0.1 (password auth), stopped afterwards."""
    bindir = find_pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found: install the postgresql package (make setup does)")
    prefix = []
    root = Path(tempfile.mkdtemp(prefix="search-pg-"))
    (root / "pw").write_text(PASSWORD + "\n")
    if os.getuid() == 0:  # initdb and postgres refuse to run as root: run them as the postgres user
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            shutil.rmtree(root)
            pytest.skip("running as root and no 'postgres' user to run the PostgreSQL server as")
        for path in (root, root / "pw"):
            os.chown(path, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"] if shutil.which("runuser") else ["su", "postgres", "-s", "/bin/sh", "-c"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    def run(*cmd):
        cmd = [str(c) for c in cmd]
        full = prefix + ([shlex.join(cmd)] if prefix[:1] == ["su"] else cmd)
        return subprocess.run(full, capture_output=True, text=True, timeout=120)

    data = root / "data"
    steps = [run(bindir / "initdb", "-D", data, "-U", "search", f"--pwfile={root / 'pw'}", "--auth=scram-sha-256",
                 "-E", "UTF8", "--no-sync")]
    if steps[-1].returncode == 0:
        steps.append(run(bindir / "pg_ctl", "-D", data, "-l", root / "server.log", "-w", "-o",
                         f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off", "start"))
    if steps[-1].returncode != 0:
        log = (root / "server.log").read_text() if (root / "server.log").exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"PostgreSQL did not start: {steps[-1].stderr.strip()[-500:]} {log[-500:]}")
    try:
        yield f"postgresql+psycopg2://search:{PASSWORD}@127.0.0.1:{port}/postgres"
    finally:
        run(bindir / "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def test_postgres_coordinator_and_a_joining_worker(project, postgres_url, tmp_path, monkeypatch, capsys):
    """The coordinator creates the study in PostgreSQL, then runs trials while a second process joins
    with the documented command (as from another host: its own output folder): every trial once.
    The objective here is the validation CER."""
    import optuna

    args = project(search={"n_trials": 0, "objective": "val_cer", "pruner": {"type": "none", "n_startup_trials": 5, "n_warmup_steps": 0,
                                                      "interval_steps": 1},
                           "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2}},
                           "trial_overrides": {"num_train_epochs": 1}})
    monkeypatch.setenv("OCR_SEARCH_STORAGE", postgres_url)
    code, out, err = run_stage(args + ["--resume"], capsys)             # creates the study, runs nothing
    assert code == 0, err
    assert optuna.get_all_study_names(storage=postgres_url) == ["ocr-lora"]
    # The "join from another host" command of stages/search.py's docstring (+ where this host keeps its data).
    log = open(tmp_path / "joiner.log", "w+")
    joiner = subprocess.Popen([sys.executable, "-m", "stages.search", "--worker", "--study-name", "ocr-lora",
                               "--n-trials", "1", "--base-output-dir", str(tmp_path / "host2"), *args],
                              env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT)
    try:
        project(search={"n_trials": 1, "objective": "val_cer", "pruner": {"type": "none", "n_startup_trials": 5, "n_warmup_steps": 0,
                                                   "interval_steps": 1},
                        "space": {"learning_rate": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2}},
                        "trial_overrides": {"num_train_epochs": 1}})
        code, out, err = run_stage(args + ["--resume"], capsys)
        assert code == 0, err
        assert joiner.wait(timeout=300) == 0, (tmp_path / "joiner.log").read_text()[-3000:]
    finally:
        if joiner.poll() is None:
            joiner.kill()

    trials = optuna.load_study(study_name="ocr-lora", storage=postgres_url).trials
    mine = [t.number for t in trials if t.user_attrs["worker"] == "w0"]
    theirs = [t.number for t in trials if t.user_attrs["worker"] != "w0"]
    assert len(theirs) == 1 and ":" in trials[theirs[0]].user_attrs["worker"]    # host:pid of the joiner
    assert len(mine) >= 1 and sorted(mine + theirs) == list(range(len(trials)))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert all(t.value == t.user_attrs["val_cer"] and t.value >= 0 for t in trials)   # objective: validation CER
    here = {int(p.parent.name.split("_")[1]) for p in Path("models/search/trials").glob("trial_*/result.json")}
    there = {int(p.parent.name.split("_")[1]) for p in (tmp_path / "host2" / "trials").glob("trial_*/result.json")}
    assert here == set(mine) and there == set(theirs)
    # The coordinator's outputs: a local SQLite copy of the study, and no password anywhere.
    assert {t.number for t in load_study().trials} >= set(mine)
    best = json.loads(Path("models/search/best_params.json").read_text())
    assert best["trial"] in mine + theirs and best["skipped"] is False and best["objective"] == "val_cer"
    assert PASSWORD not in out + err
    for path in list(Path("models").rglob("*")) + [tmp_path / "joiner.log"]:
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
