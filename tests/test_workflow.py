"""The experiment workflow of the README in a real temporary git + DVC project (issue 8, part 5).

One project per module: the tracked files of this repository (minus tests/bench/docs), params.yaml
shrunk for speed, `dvc repro` once, committed. The tests then reuse it: `dvc exp run -S`, the queue
with two parallel workers, `dvc metrics diff` / `dvc plots diff` between commits, push / pull to a
local folder remote, and the Optuna study file that `optuna-dashboard` opens.
Everything runs the real stage code through DVC; only the sizes in params.yaml are small.
"""
import hashlib
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, SERIF, make_rows
from stages.lib.synthetic import render_line

BIN = Path(sys.executable).parent
DVC = shutil.which("dvc", path=str(BIN)) or shutil.which("dvc")
ENV = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "OMP_WAIT_POLICY": "PASSIVE",
       "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "DVC_NO_ANALYTICS": "1",
       "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
ENV.pop("PYTHONPATH", None)
N_TRIALS = 2
QUEUE_LIMIT_S = 1200

# e2e: whole-pipeline runs through DVC, in `make test-e2e` (CI runs it after `make test`)
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(DVC is None, reason="dvc is not installed")]


def shrink(params):
    """Small sizes everywhere: the stages' code is the real one, only the amounts of work change."""
    params["synth"].update(n_lines=60, lines_per_document=5)
    params["split"]["test_ratio"] = 0.5
    params["base"].update(pretrain_lines=108, pretrain_steps=4, pretrain_batch_size=8)
    params.update(num_train_epochs=2, per_device_train_batch_size=8, eval_steps=2, logging_steps=1,
                  val_ratio=0.2, warmup_ratio=0.0, lora_r=16, backend="transformers")
    # the space covers lora_r, as the default one does: `-S lora_r=...` must still train with that value
    params["search"].update(n_trials=N_TRIALS, mode="random", trial_overrides={"num_train_epochs": 1},
                            space={"learning_rate": {"type": "loguniform", "low": 1.0e-3, "high": 1.0e-2},
                                   "lora_r": {"type": "categorical", "choices": [4, 8]}})
    params["evaluate"].update(top_k=4, workers=2, max_tokens=24)
    params["score"]["bootstrap_samples"] = 50
    params["analyze"].update(top_n=5, worst_n=4, top_k_errors=5)
    params["learning_curve"].update(train_rows=[5, "all"], bootstrap_samples=50)
    return params


class Project:
    def __init__(self, root):
        self.root = root

    def run(self, *cmd, check=True, timeout=900):
        result = subprocess.run([str(c) for c in cmd], cwd=self.root, env=ENV, capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, f"{' '.join(map(str, cmd))}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
        return result

    def dvc(self, *args, **kw):
        return self.run(DVC, *args, **kw)

    def git(self, *args, **kw):
        return self.run("git", *args, **kw)

    def json(self, rel):
        return json.loads((self.root / rel).read_text(encoding="utf-8"))

    def commit(self, message):
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def json_at(self, rev, rel):
        """A git-tracked file (e.g. metrics/train.json, a cache: false out) as committed in `rev`."""
        return json.loads(self.git("show", f"{rev}:{rel}").stdout)

    def exps(self):
        """{experiment name: {"params": params.yaml values, "metrics": metrics files}} from `dvc exp show --json`
        (-A: the experiments of every commit)."""
        out = {}
        for rev in json.loads(self.dvc("exp", "show", "--json", "-A").stdout):
            for exp in rev.get("experiments") or []:
                for ex in exp.get("revs") or []:
                    data = ex.get("data") or {}
                    out[ex.get("name") or data.get("name") or ex["rev"]] = {
                        "status": data.get("status"), "rev": data.get("rev") or ex.get("rev"),
                        "params": (data.get("params", {}).get("params.yaml") or {}).get("data", {}),
                        "metrics": {k: v.get("data", {}) for k, v in (data.get("metrics") or {}).items()}}
        return out


def shown_lora_r(project):
    """{experiment name: lora_r} of the experiment rows of the `dvc exp show` table (the command users read)."""
    table = project.dvc("exp", "show", "--no-pager", "--md", "-A", "--keep", "^(Experiment|lora_r)$",
                        "--drop", ".*").stdout
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and "[" in cells[0]:
            rows[cells[0].split("[")[1].rstrip("]")] = int(cells[1])
    return rows


def cached_outs(root):
    """Outputs of dvc.yaml that DVC caches (cache: false ones stay in git, not in the remote)."""
    outs = []
    for stage in yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"].values():
        for out in stage.get("outs", []):
            path, opts = (next(iter(out.items())) if isinstance(out, dict) else (out, {}))
            if opts.get("cache", True):
                outs.append(path)
    return outs


def digests(root, paths):
    found = {}
    for rel in paths:
        p = root / rel
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            found[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return found


def copy_project(root, adjust=shrink, with_lock=False):
    """A fresh clone, as a user gets it: the tracked files (minus tests/bench/docs, and minus the outputs
    of a repro in this checkout unless with_lock), params.yaml adjusted, git initialised and committed."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    skip = ("tests/", "bench/", "docs/", ".ci/")
    for rel in files:
        if rel.startswith(skip) or (not with_lock and (rel == "dvc.lock" or rel.startswith(("metrics/", "plots/")))):
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, root / rel)
    params = adjust(yaml.safe_load((root / "params.yaml").read_text(encoding="utf-8")))
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False), encoding="utf-8")
    p = Project(root)
    p.git("init", "-q", "-b", "main")
    p.commit("project")
    return p


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    p = copy_project(tmp_path_factory.mktemp("workflow") / "repo")
    started = time.monotonic()
    p.dvc("repro", timeout=1800)
    p.repro_s = time.monotonic() - started
    p.commit("baseline")
    assert p.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")
    return p


@pytest.fixture(scope="module")
def r32(project):
    """`dvc exp run -S lora_r=32` in the workspace, then committed: HEAD~1 is the baseline (lora_r 16)."""
    before = project.json("metrics/train.json")
    done = project.dvc("exp", "run", "-n", "r32", "-S", "lora_r=32", timeout=1800)
    after = project.json("metrics/train.json")
    project.commit("lora_r 32")
    return {"stdout": done.stdout, "before": before, "after": after}


def test_exp_run_set_param_retrains_with_it(project, r32):
    out = r32["stdout"]
    for stage in ("train", "merge", "evaluate@finetuned", "normalize-score", "analyze"):
        assert f"Running stage '{stage}'" in out, out
    for stage in ("synth", "split", "base", "evaluate@base", "engine@tesseract"):
        assert f"Running stage '{stage}'" not in out
    # what trained is what the table says, although the search space covers lora_r (its best is 4 or 8)
    assert project.json("models/lora/adapter_config.json")["r"] == 32
    assert r32["after"]["trained_with"]["lora_r"] == 32 and r32["after"]["adapter_r"] == 32
    assert yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))["lora_r"] == 32
    assert r32["after"]["eval_loss"] != r32["before"]["eval_loss"]
    exps = project.exps()
    assert "r32" in exps and exps["r32"]["params"]["lora_r"] == 32, exps
    # DVC's metrics are the headline figures only (the table stays readable); train.json is in the experiment's commit
    assert set(exps["r32"]["metrics"]) == {"metrics/score.json"}, exps["r32"]["metrics"]
    assert exps["r32"]["metrics"]["metrics/score.json"] == project.json("metrics/score.json")
    assert project.json_at(exps["r32"]["rev"], "metrics/train.json")["eval_loss"] == r32["after"]["eval_loss"]
    assert shown_lora_r(project)["r32"] == 32


def test_queue_runs_two_experiments_in_parallel(project, r32):
    project.dvc("exp", "run", "--queue", "-S", "lora_r=8,16")
    queued = project.dvc("queue", "status").stdout
    assert queued.count("Queued") == 2, queued
    # the workers it spawns inherit stdout/stderr: through a pipe (capture_output), `queue start` would
    # return only when they exit, i.e. after both experiments; a file lets it return at once.
    with open(project.root / ".dvc" / "tmp" / "queue-start.log", "w") as log:
        started = subprocess.run([DVC, "queue", "start", "-j", "2"], cwd=project.root, env=ENV, stdout=log,
                                 stderr=subprocess.STDOUT, timeout=120)
    assert started.returncode == 0, (project.root / ".dvc" / "tmp" / "queue-start.log").read_text()
    deadline = time.monotonic() + QUEUE_LIMIT_S
    peak_running, seen = 0, []
    while True:
        status = project.dvc("queue", "status").stdout
        seen.append(f"{time.monotonic():.0f} {' '.join(status.split())}")
        peak_running = max(peak_running, status.count("Running"))
        if "Queued" not in status and "Running" not in status:
            break
        assert time.monotonic() < deadline, f"queue not done after {QUEUE_LIMIT_S}s:\n{status}"
        time.sleep(5)
    logs = {}
    for line in status.splitlines()[1:]:
        if line.split() and line.split()[0] != "Task":
            logs[line.split()[0]] = project.dvc("queue", "logs", line.split()[0], check=False).stdout
    assert status.count("Success") == 2 and "Failed" not in status, f"{status}\n{logs}"
    assert peak_running == 2, "the two experiments did not run at the same time:\n" + "\n".join(seen)
    runs = {e["params"]["lora_r"]: e for name, e in project.exps().items() if name != "r32"}
    assert {8, 16} <= set(runs), runs
    # each experiment's adapter has the rank its params say (read from the saved adapter_config.json)
    train = {r: project.json_at(runs[r]["rev"], "metrics/train.json") for r in (8, 16)}
    assert {r: train[r]["adapter_r"] for r in (8, 16)} == {8: 8, 16: 16}
    losses = {r: train[r]["eval_loss"] for r in (8, 16)}
    assert losses[8] != losses[16], losses
    shown = shown_lora_r(project)
    assert sorted(v for k, v in shown.items() if k != "r32") == [8, 16], shown
    # the workspace (HEAD, lora_r 32) is untouched by queued runs
    assert project.json("models/lora/adapter_config.json")["r"] == 32
    assert project.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")


def test_metrics_and_plots_diff_between_commits(project, r32):
    diff = json.loads(project.dvc("metrics", "diff", "HEAD~1", "--json").stdout)
    assert set(diff) <= {"metrics/score.json"}, sorted(diff)   # DVC's metrics: the headline figures only
    # the other stages' figures are plain git-tracked outputs: git shows what changed
    old, new = project.json_at("HEAD~1", "metrics/train.json"), project.json("metrics/train.json")
    assert old["eval_loss"] != new["eval_loss"] and "train_loss" in new
    changed = project.git("diff", "--name-only", "HEAD~1", "--", "metrics").stdout.split()
    assert "metrics/split.json" not in changed and "metrics/base.json" not in changed, changed
    params = json.loads(project.dvc("params", "diff", "HEAD~1", "--json").stdout)
    assert {k: params["params.yaml"]["lora_r"][k] for k in ("old", "new")} == {"old": 16, "new": 32}, params
    plots = json.loads(project.dvc("plots", "diff", "HEAD~1", "--json").stdout)["data"]
    for png in ("train_loss", "search_history", "errors_top_edits"):
        assert f"plots/analysis/{png}.png" in plots, sorted(plots)
    # the train and eval loss curves of both commits, and different ones
    values = plots["loss"][0]["content"]["data"]["values"]
    curves = {rev: [(v["filename"], v["step"], v["loss"]) for v in values if v["rev"] == rev] for rev in ("HEAD~1", "workspace")}
    assert curves["HEAD~1"] and curves["workspace"] and curves["HEAD~1"] != curves["workspace"], values
    assert {v["filename"] for v in values} >= {"train/loss.tsv", "eval/loss.tsv"}, values
    images = {img["revisions"][0]: Path(img["url"]).read_bytes() for img in plots["plots/analysis/train_loss.png"]}
    assert set(images) == {"HEAD~1", "workspace"} and images["HEAD~1"] != images["workspace"]
    html = project.dvc("plots", "diff", "HEAD~1", "-o", "dvc_plots_diff").stdout
    assert (project.root / "dvc_plots_diff" / "index.html").is_file(), html


def test_push_and_pull_to_a_local_remote(project, r32, tmp_path):
    remote = tmp_path / "remote"
    project.dvc("remote", "add", "-d", "--local", "store", str(remote))
    project.dvc("push")
    outs = cached_outs(project.root)
    assert {"data/synthetic", "models/base", "models/lora", "models/merged"} <= set(outs)
    before = digests(project.root, outs)
    assert len(before) > 20 and any(k.startswith("models/lora/") for k in before)
    shutil.rmtree(project.root / ".dvc" / "cache")
    for rel in outs:
        p = project.root / rel
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    assert "deleted" in project.dvc("status").stdout
    project.dvc("pull")
    assert digests(project.root, outs) == before
    assert project.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url):
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def test_study_file_opens_with_optuna_and_the_dashboard(project):
    import optuna

    name = yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))["search"]["study_name"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{project.root / 'models/search/study.db'}")
    assert len(study.trials) == N_TRIALS
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in study.trials)
    assert {"learning_rate", "lora_r"} == set(study.best_trial.params)
    dashboard = shutil.which("optuna-dashboard", path=str(BIN))
    if dashboard is None:
        pytest.skip("optuna-dashboard is not installed (requirements.txt pins it)")
    port = free_port()
    log = project.root / ".dvc" / "tmp" / "dashboard.log"
    with open(log, "w") as out:
        # the README's command, run from the project root
        server = subprocess.Popen([dashboard, "sqlite:///models/search/study.db", "--host", "127.0.0.1",
                                   "--port", str(port)], cwd=project.root, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.5)
        assert [s["study_name"] for s in studies] == [name]
        shown = get_json(f"http://127.0.0.1:{port}/api/studies/{studies[0]['study_id']}?after=0")
        assert len(shown["trials"]) == N_TRIALS
        assert sorted(t["number"] for t in shown["trials"]) == [t.number for t in study.trials]
    finally:
        server.terminate()
        server.wait(timeout=30)
    # looking at the study does not modify the DVC-tracked file
    assert project.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")


# ---------------------------------------------------------------- fresh clones

def without_search(params):
    params = shrink(params)
    params["search"]["n_trials"] = 0
    return params


def assert_search_skipped(p, output):
    assert "search skipped (n_trials 0)" in output, output
    best = p.json("models/search/best_params.json")
    assert best["skipped"] is True and best["params"] == {}
    trials = p.root / "models/search/trials"
    assert [f.name for f in trials.iterdir()] == ["README.txt"]   # no trial folder, and not empty
    assert "is empty" not in output, output


def test_skipping_the_search_works_through_dvc_repro_on_a_fresh_clone(tmp_path):
    p = copy_project(tmp_path / "repo", without_search)
    done = p.dvc("repro", "search", timeout=900)
    assert_search_skipped(p, done.stdout + done.stderr)
    assert "search" not in p.dvc("status", "search").stdout.replace("Data and pipelines are up to date", "")
    # and `--apply-best` says there is nothing to apply, in one line
    applied = p.run(sys.executable, "-m", "stages.search", "--apply-best", check=False)
    assert applied.returncode == 2 and "the search was skipped" in applied.stderr
    assert len(applied.stderr.strip().splitlines()) == 1


def test_skipping_the_search_works_through_dvc_exp_run_on_a_fresh_clone(tmp_path):
    p = copy_project(tmp_path / "repo", without_search)
    done = p.dvc("exp", "run", "search", timeout=900)
    assert "Running stage 'search'" in done.stdout
    assert_search_skipped(p, done.stdout + done.stderr)


def readme_block(section):
    """The first ```bash block of the README section titled `section` (the user's commands, as written)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    body = text[text.index(f"## {section}"):]
    body = body[:body.index("\n## ", 1)] if "\n## " in body[1:] else body
    block = body[body.index("```bash") + len("```bash"):]
    return [line.strip() for line in block[:block.index("```")].splitlines() if line.strip()]


def user_data(root, n_docs=10, lines=5):
    """Their data: folders of rendered lines (one folder = one document) and ocr.json in the original format."""
    rows = []
    for d in range(n_docs):
        for row in make_rows(root / "data/raw_data/images" / f"doc{d:02d}", lines, seed=d + 100):
            rows.append({"img_path": str(Path(row["image_path"]).relative_to(root)), "ocr_results": row["ocr_text"]})
    (root / "data/raw_data/ocr.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    return rows


def test_readme_own_data_steps_leave_git_and_dvc_clean_and_pixels_are_versioned(tmp_path):
    p = copy_project(tmp_path / "repo", with_lock=True)        # a clone: dvc.lock of the default run included
    user_data(p.root)
    params = p.root / "params.yaml"   # step 1 of the README: split.data names their folder
    params.write_text(params.read_text(encoding="utf-8").replace("  data: data/synthetic", "  data: data/raw_data"),
                      encoding="utf-8")
    steps = readme_block("Bring your own data")
    assert steps[0].startswith("dvc remove synth") and any(s.startswith("dvc repro") for s in steps)
    for step in steps:
        p.run("bash", "-c", step, timeout=1800)
    assert p.git("status", "--porcelain").stdout == ""
    assert p.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")

    # One test image gets new pixels (same path, same label); `dvc add data/raw_data && dvc repro`.
    top_k = yaml.safe_load((p.root / "params.yaml").read_text(encoding="utf-8"))["evaluate"]["top_k"]
    evaluated = p.json("data/input/ocr_test.json")[:top_k]
    target = evaluated[1]
    runs = ("finetuned", "base", "tesseract", "paddleocr")
    before = {run: p.json(f"results/{run}.json") for run in runs}
    score_before = p.json("metrics/score.json")
    render_line("ABC123", SERIF, 24, 128, random.Random(5)).save(p.root / target["image_path"])
    done = p.run("bash", "-c", "dvc add data/raw_data && dvc repro", timeout=1800)
    for stage in ("split", "evaluate@finetuned", "evaluate@base", "engine@tesseract", "engine@paddleocr",
                  "normalize-score", "browse"):
        assert f"Running stage '{stage}'" in done.stdout, done.stdout
    for stage in ("base", "train", "search", "merge"):   # a test image: nothing trained on it
        assert f"Running stage '{stage}'" not in done.stdout, done.stdout
    for run in runs:
        after = p.json(f"results/{run}.json")
        assert after["evaluated_this_run"] == 1, (run, after["evaluated_this_run"])   # only the changed image
        old = {s["image_path"]: s for s in before[run]["samples"]}
        new = {s["image_path"]: s for s in after["samples"]}
        assert new[target["image_path"]]["image_sha256"] != old[target["image_path"]]["image_sha256"]
        for path, sample in new.items():
            if path != target["image_path"]:
                assert sample["prediction"] == old[path]["prediction"], (run, path)   # kept by resume
    tess_old = {s["image_path"]: s for s in before["tesseract"]["samples"]}[target["image_path"]]
    tess_new = {s["image_path"]: s for s in p.json("results/tesseract.json")["samples"]}[target["image_path"]]
    assert tess_new["prediction"] != tess_old["prediction"]          # Tesseract read the new pixels
    assert p.json("metrics/score.json")["baselines"]["tesseract"] != score_before["baselines"]["tesseract"]
    # an unchanged image is never predicted again: a second repro does nothing
    assert p.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")
