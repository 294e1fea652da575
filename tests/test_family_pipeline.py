"""Gemma 4 and Qwen3-VL end to end through DVC (issue 20), as a user of each family runs it.

A tiny model of the family, built offline from the family's config with its real processor settings
(stages/lib/families/), stands in for a downloaded checkpoint: `model_name` points at its folder and
nothing else is set. A fresh project (test_workflow.copy_project: the tracked files, params.yaml
shrunk) then runs `dvc repro`: base -> search (2 trials) -> train -> merge -> evaluate through a real
`transformers serve` -> normalize-score -> browse (and the rest of the default pipeline). The checks
are the ones that differ per family: the family and its resolution settings are read from the
folder, LoRA reaches both towers under the family's names, the merged folder is in the key layout
vLLM 0.33.0's loader for the family maps and passed the parity check, and the server read each page
with as many prompt tokens (image tokens included) as training's collator built for it.
Whether each family *learns* needs a pre-trained base and minutes more per family: README, "Model
families" (`dvc exp run -S base.family=...`), not this test.
"""
import json

import pytest
import yaml

from stages.lib.families import family_of, gemma4, qwen3_vl, resolution_settings
from stages.lib.synthetic import charset
from test_workflow import DVC, copy_project, shrink

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(DVC is None, reason="dvc is not installed")]


@pytest.fixture(scope="module", params=[gemma4, qwen3_vl], ids=lambda f: f.MODEL_TYPE)
def family_run(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(family.MODEL_TYPE)
    checkpoint = family.build_tiny(root / "checkpoint", charset())

    def adjust(params):
        params = shrink(params)
        params["model_name"] = str(checkpoint)   # the only change a user of the family makes
        return params

    project = copy_project(root / "repo", adjust)
    project.dvc("repro", timeout=1800)
    project.commit(f"{family.MODEL_TYPE} baseline")
    return family, checkpoint, project


def test_dvc_repro_runs_every_stage_and_leaves_the_project_clean(family_run):
    family, _, project = family_run
    assert project.dvc("status").stdout.strip().startswith("Data and pipelines are up to date")
    score = project.json("metrics/score.json")
    assert score["overall_cer"] is not None and set(score["baselines"]) >= {"base", "tesseract", "paddleocr"}
    page = (project.root / "browse" / "index.html").read_text(encoding="utf-8")
    data = (project.root / "browse" / "data.js").read_text(encoding="utf-8")
    assert "fine-tuned" in data and "base (no fine-tuning)" in data and "<script" in page


def test_base_reads_the_family_and_its_resolution_settings_from_the_folder(family_run):
    family, checkpoint, project = family_run
    base = project.json("metrics/base.json")
    assert base["family"] == family.MODEL_TYPE and base["built"] is False
    assert base["resolution"] == resolution_settings(checkpoint) and set(base["resolution"]) == set(family.IMAGE_SETTINGS)
    assert all(value is not None for value in base["resolution"].values())
    assert family_of(project.root / "models" / "merged") is family


def test_search_ran_two_trials_of_the_family(family_run):
    _, _, project = family_run
    lines = (project.root / "models/search/trials.csv").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 1 + 2
    states = [line.split(",")[1] for line in lines[1:]]
    assert set(states) <= {"COMPLETE", "PRUNED"} and "COMPLETE" in states


def test_lora_reached_both_towers_and_the_projector_under_the_familys_names(family_run):
    family, _, project = family_run
    train = project.json("metrics/train.json")
    modules = train["trainable_modules"]
    assert {f"lora:{family.VISION_TOWER}", f"lora:{family.LANGUAGE_MODEL}"} <= set(modules), modules
    assert any(name in modules for name in family.MODULES_TO_SAVE), modules
    assert all(count > 0 for count in modules.values()) and sum(modules.values()) == train["trainable_params"]


def test_the_merged_folder_is_in_vllms_layout_and_passed_parity(family_run):
    family, _, project = family_run
    merge = project.json("metrics/merge.json")
    assert merge["passed"] is True and merge["family"] == family.MODEL_TYPE
    assert merge["architectures"] == [family.ARCHITECTURE]
    assert family.layout_problems(project.root / "models" / "merged") == []
    assert merge["vision_lora_layers"] > 0


def test_the_server_read_each_page_with_trainings_prompt_tokens(family_run):
    """`transformers serve` built each request's prompt (the image tokens of the family's resolution
    rule included) to the length OcrCollator builds in training, from the merged folder's processor."""
    family, _, project = family_run
    from stages.lib.modeling import load_processor
    from stages.lib.training import OcrCollator

    params = yaml.safe_load((project.root / "params.yaml").read_text(encoding="utf-8"))
    result = project.json("results/finetuned.json")
    assert result["status"] == "complete" and result["failed_count"] == 0
    assert result["total_samples"] == params["evaluate"]["top_k"]
    collator = OcrCollator(load_processor(project.root / "models" / "merged", params["image"]), params["instruction"])
    for sample in result["samples"]:
        row = {"image_path": str(project.root / sample["image_path"]), "ocr_text": sample["label"]}
        assert sample["prompt_tokens"] == collator.encode(row)["prompt_length"], sample["image_path"]
    scored = project.json("scored/finetuned.json")
    assert scored["total_samples"] == result["total_samples"] and scored["overall_cer"] is not None
    assert json.dumps(scored, ensure_ascii=False).count('"prediction"') == result["total_samples"]
