"""tools/gpu_check.sh cannot drift from the stages: every command line it would run on a GPU is parsed
here by the stage's own argument parser, every params.yaml it would write is a valid training config,
and its backend comparison (tools/compare_backends.py) runs for real on the CPU path."""
import argparse
import importlib
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT
from stages.lib.training import training_config

sys.path.insert(0, str(ROOT / "tools"))
import compare_backends  # noqa: E402


class Parsed(Exception):
    """Raised right after a stage's parser accepted its arguments: nothing heavy runs."""


def dry_run(tmp_path):
    done = subprocess.run(["bash", "tools/gpu_check.sh", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                          text=True, env=dict(os.environ, DRY_RUN="1"), timeout=60)
    assert done.returncode == 0, done.stderr
    steps = []
    for line in done.stdout.splitlines():
        _, name, sets, command = line.split("\t")
        steps.append((name, shlex.split(sets), shlex.split(command)))
    return steps


def test_dry_run_lists_every_step(tmp_path):
    names = [name for name, _, _ in dry_run(tmp_path)]
    assert names == ["compare_transformers_16", "compare_unsloth_16", "compare_transformers_4", "compare_unsloth_4",
                     "compare", "unsloth_bf16", "merge_unsloth", "unsloth_4bit", "transformers_bf16", "merge_peft",
                     "transformers_4bit"]


def test_every_stage_command_parses_and_every_params_file_is_valid(tmp_path, monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        original(self, args, namespace)   # exits 2 on an unknown flag or a bad value
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    base = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    stages_seen = set()
    for name, sets, command in dry_run(tmp_path):
        params = dict(base, **{k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in sets)})
        config = training_config(params)          # raises UserError on a bad key or value
        assert config["image"]["do_pan_and_scan"] is (any(s.startswith("image=") for s in sets))
        if command[1] != "-m":   # tools/compare_backends.py: its own dispatch
            assert command[1].endswith("tools/compare_backends.py") and command[2] in ("one", "compare")
            continue
        module = importlib.import_module(command[2])
        with pytest.raises(Parsed):
            module.main(command[3:])
        stages_seen.add(command[2])
    assert stages_seen == {"stages.train", "stages.merge"}


def test_the_backend_comparison_runs_and_catches_a_difference(tmp_path, capsys):
    """The transformers 16-bit run of the comparison, for real (the unsloth and 4-bit runs need CUDA)."""
    compare_backends.fixture(tmp_path / "fixture")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    compare_backends.one("transformers", 16, str(tmp_path / "fixture/base"), str(tmp_path / "fixture/rows.json"),
                         first, compare_backends.PAN_AND_SCAN)
    run = json.loads(first.read_text())
    assert run["image_tokens"] == [256 * 3] * 4           # 1344x896 pages: the page and 2 crops, 256 tokens each
    assert run["pixel_shape"] == [12, 3, 896, 896] and run["cut_rows"] == 0
    assert set(run["trainable_modules"]) == {"lora:language_model", "lora:vision_tower", "multi_modal_projector"}
    second.write_text(json.dumps(run))
    assert compare_backends.compare([first, second]) == 0
    second.write_text(json.dumps(dict(run, sequence_lengths=[n - 1 for n in run["sequence_lengths"]])))
    assert compare_backends.compare([first, second]) == 1
    assert "DIFFERENT sequence_lengths" in capsys.readouterr().out
