"""What `dvc exp show` and a re-run show a newcomer (issue 24): DVC's metrics are the headline
quality figures only, so the README's comparison table has few columns; what varies by machine
goes to metrics/runtime/STAGE.json, written by every stage that DVC runs."""
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.lib.cli import UserError, run_main

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]
ENV = {**os.environ, "DVC_NO_ANALYTICS": "1", "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
       "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}
ENV.pop("DVC_STAGE", None)

# metrics/score.json as the score stage writes it: headline figures only (stages/score.py
# headline(): the main run's CER and F1 with intervals and failure-mode rates, each baseline's CER,
# F1 and rates, each pair's differences with intervals and p-values)
RATES = {name: 0.001 for name in ("repetition", "text_on_empty", "chatter", "markup", "truncated", "empty",
                                  "script_confusion", "length_ratio")}
PAIR = {key: 0.01 for key in ("cer_diff", "cer_diff_ci95_low", "cer_diff_ci95_high", "cer_p",
                              "f1_diff", "f1_diff_ci95_low", "f1_diff_ci95_high", "f1_p")}
HEADLINE = {"overall_cer": 0.0403, "overall_cer_ci95_low": 0.0338, "overall_cer_ci95_high": 0.0465,
            "overall_f1": 0.957, "overall_f1_ci95_low": 0.9494, "overall_f1_ci95_high": 0.9639,
            "failure_rates": RATES,
            "baselines": {name: {"overall_cer": cer, "overall_f1": 1 - cer, "failure_rates": RATES}
                          for name, cer in (("base", 0.0825), ("tesseract", 0.0626), ("paddleocr", 0.0205))},
            "pairs": {f"finetuned_vs_{name}": PAIR for name in ("base", "tesseract", "paddleocr")}}
# after `dvc exp run -S lora_r=32`: the main run's figures, its rates and the pairs move
CHANGED = {**HEADLINE, "overall_cer": 0.05, "overall_cer_ci95_low": 0.04, "overall_cer_ci95_high": 0.06,
           "overall_f1": 0.95, "failure_rates": {**RATES, "repetition": 0.002},
           "pairs": {name: {**PAIR, "cer_diff": 0.02} for name in HEADLINE["pairs"]}}


def sh(*cmd, cwd, env=ENV):
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{cmd}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
    return done.stdout


def stages_of(dvc_yaml):
    return yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]


def out_paths(stage):
    return [next(iter(o)) if isinstance(o, dict) else o for o in stage.get("outs", [])]


def readme_commands():
    """The README's `dvc exp show --only-changed ...` lines (the comparison tables), as words."""
    return [shlex.split(line.split("  #")[0])[1:]
            for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("dvc exp show --only-changed")]


def test_dvc_metrics_are_the_headline_file_only():
    declared = {next(iter(m)) if isinstance(m, dict) else m
                for stage in stages_of(ROOT / "dvc.yaml").values() for m in stage.get("metrics", [])}
    assert declared == {"metrics/score.json"}


def test_every_stage_has_its_runtime_file():
    for name, stage in stages_of(ROOT / "dvc.yaml").items():
        stage = stage.get("do", stage)
        expected = f"metrics/runtime/{name}-${{key}}.json" if "foreach" in stages_of(ROOT / "dvc.yaml")[name] \
            else f"metrics/runtime/{name}.json"
        assert expected in out_paths(stage), name


def test_the_comparison_table_has_few_columns(tmp_path):
    """A real DVC repo with the project's dvc.yaml and params.yaml: the committed run and a
    workspace with lora_r 32 and other figures, as after `dvc exp run -S lora_r=32`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for rel in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / rel, repo / rel)
    score = repo / "metrics" / "score.json"
    score.parent.mkdir()
    score.write_text(json.dumps(HEADLINE))
    for rel in ("train.json", "split.json"):   # plain outs: never columns
        (repo / "metrics" / rel).write_text(json.dumps({"eval_loss": 0.01, "runtime_s": 55.0, "count": 200}))
    sh("git", "init", "-q", cwd=repo)
    sh(*DVC, "init", "-q", cwd=repo)
    sh("git", "add", "-A", cwd=repo)
    sh("git", "commit", "-qm", "run", cwd=repo)
    params = (repo / "params.yaml").read_text(encoding="utf-8")
    (repo / "params.yaml").write_text(params.replace("\nlora_r: 16", "\nlora_r: 32"), encoding="utf-8")
    score.write_text(json.dumps(CHANGED))

    wide, intervals = readme_commands()
    header = [c for c in sh(*DVC, *wide, "--csv", cwd=repo).splitlines()[0].split(",") if c not in ("rev", "Experiment")]
    assert header == ["overall_cer", "overall_f1", "baselines.base.overall_cer",
                      "baselines.tesseract.overall_cer", "baselines.paddleocr.overall_cer", "lora_r"], header
    header = [c for c in sh(*DVC, *intervals, "--csv", cwd=repo).splitlines()[0].split(",") if c not in ("rev", "Experiment")]
    assert header == [*[f"overall_{m}{end}" for m in ("cer", "f1") for end in ("", "_ci95_low", "_ci95_high")]]
    for command in (wide, intervals):   # as a user sees it in a terminal 160 columns wide: nothing cut
        table = sh(*DVC, *command, "--no-pager", cwd=repo, env={**ENV, "COLUMNS": "160"})
        assert "…" not in table and max(map(len, table.splitlines())) <= 160, table
    # every dependency's hash column (named by its path) is dropped, as after a real `dvc exp run`
    drop = re.compile(wide[wide.index("--drop") + 1])
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    deps = {dep for stage in stages_of(ROOT / "dvc.yaml").values() for dep in stage.get("do", stage).get("deps", [])
            if dep not in ("${item.dir}", "${split.data}")}
    deps |= {row["dir"] for row in params["runs"]["models"].values()} | {params["split"]["data"]}
    assert deps and not [dep for dep in deps if not drop.match(dep)]
    full = sh(*DVC, "exp", "show", "--csv", cwd=repo).splitlines()[0].split(",")
    assert len(full) > 100   # what --csv gives for the rest


def test_run_main_writes_the_runtime_file_only_under_dvc_and_on_success(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)

    def stage(argv):
        sum(range(200_000))

    monkeypatch.delenv("DVC_STAGE", raising=False)
    run_main(stage, [])
    assert not (tmp_path / "metrics").exists()

    monkeypatch.setenv("DVC_STAGE", "evaluate@base")
    run_main(stage, [])
    runtime = json.loads((tmp_path / "metrics/runtime/evaluate-base.json").read_text())
    assert runtime["wall_s"] >= 0 and runtime["cpu_s"] > 0 and runtime["peak_rss_bytes"] > 2 ** 20

    def failing(argv):
        raise UserError("params.yaml: bad")

    monkeypatch.setenv("DVC_STAGE", "split")
    with pytest.raises(SystemExit) as exit_info:
        run_main(failing, [])
    assert exit_info.value.code == 2 and not (tmp_path / "metrics/runtime/split.json").exists()


def test_dvc_repro_writes_the_stage_runtime_out(tmp_path):
    """`dvc repro synth` of the project's own stage: its runtime file is an out DVC knows."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "stages", repo / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["synth"].update(n_lines=6, lines_per_document=3)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    synth = stages_of(ROOT / "dvc.yaml")["synth"]
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"synth": synth}}), encoding="utf-8")
    sh("git", "init", "-q", cwd=repo)
    sh(*DVC, "init", "-q", cwd=repo)
    env = {**ENV, "PATH": f"{Path(sys.executable).parent}:{ENV['PATH']}"}
    sh(*DVC, "repro", "synth", cwd=repo, env=env)
    runtime = json.loads((repo / "metrics/runtime/synth.json").read_text())
    assert runtime["cpu_s"] > 0 and runtime["wall_s"] >= 0   # wall_s is rounded to 0.1 s
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    assert "metrics/runtime/synth.json" in [o["path"] for o in lock["stages"]["synth"]["outs"]]


def test_repro_stages_nothing_behind_the_users_back():
    import configparser

    config = configparser.ConfigParser()
    config.read(ROOT / ".dvc" / "config")
    assert config.get("core", "autostage", fallback="false") == "false"
