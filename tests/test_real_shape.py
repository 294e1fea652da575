"""A tiny Gemma 3 in the real shape (896 px, 14 px patches, 256 image tokens, Gemma 3's chat template
and special tokens; hidden sizes tiny) through base -> train -> merge -> evaluate (a real
`transformers serve`) -> score, with pan-and-scan off and on (params `image:`). The image tokens of
every served request are what the settings say, and equal training's (the collator's) count."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from PIL import Image

from conftest import ROOT
from stages.lib.families import family_image_settings, gemma3
from stages.lib.modeling import load_processor
from stages.lib.prompt import DEFAULT_INSTRUCTION
from stages.lib.training import OcrCollator

sys.path.insert(0, str(ROOT / "tools"))
import compare_backends  # noqa: E402

pytestmark = pytest.mark.e2e   # base -> train -> merge -> evaluate -> score at 896 px: `make test-e2e`

# 1344x896 pages: aspect 1.5, so Gemma 3's pan-and-scan (min crop 256 px, ratio from 1.2) adds 2 crops
PAGE = (1344, 896)
CROPS = 2
PAN_AND_SCAN = compare_backends.PAN_AND_SCAN


@pytest.fixture(scope="module")
def fixture_dir(tmp_path_factory):
    """The GPU check's fixture (tools/compare_backends.py): the real-shaped tiny base and 8 pages."""
    folder = tmp_path_factory.mktemp("real_shape")
    compare_backends.fixture(folder)
    return folder


@pytest.fixture(scope="module")
def real_base(fixture_dir):
    return fixture_dir / "base"


@pytest.fixture(scope="module")
def pages(fixture_dir):
    """8 pages of 1344x896 px, each a rendered line scaled up on white paper."""
    rows = json.loads((fixture_dir / "rows.json").read_text(encoding="utf-8"))
    assert {Image.open(r["image_path"]).size for r in rows} == {PAGE}
    return rows


def stage(project, name, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    start = time.time()
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=project, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"{name}: {time.time() - start:.1f} s")
    return done


def test_real_shape_is_gemma3s(real_base):
    config = json.loads((real_base / "config.json").read_text())
    processor = load_processor(real_base)
    assert config["vision_config"]["image_size"] == 896 and config["vision_config"]["patch_size"] == 14
    assert config["mm_tokens_per_image"] == processor.image_seq_length == 256
    assert processor.image_processor.size == {"height": 896, "width": 896}
    assert processor.tokenizer.convert_ids_to_tokens([config["image_token_index"]]) == ["<image_soft_token>"]
    assert "<start_of_turn>model\n" in OcrCollator(processor, DEFAULT_INSTRUCTION).prompt


@pytest.mark.parametrize("image, crops", [({"do_pan_and_scan": False}, 0), (PAN_AND_SCAN, CROPS)],
                         ids=["pan-and-scan-off", "pan-and-scan-on"])
def test_base_train_merge_evaluate_score(real_base, pages, tmp_path, image, crops):
    project = tmp_path / "project"
    (project / "data" / "input").mkdir(parents=True)
    (project / "data/input/ocr_non_test.json").write_text(json.dumps(pages[:6], ensure_ascii=False))
    (project / "data/input/ocr_test.json").write_text(json.dumps(pages[6:], ensure_ascii=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(model_name=str(real_base), num_train_epochs=1, per_device_train_batch_size=2, eval_steps=1,
                  logging_steps=1, val_ratio=0.25, warmup_ratio=0.0, backend="transformers")
    params["image"].update(image)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    gemma3_image = family_image_settings(gemma3, params["image"])   # the others' settings are not Gemma 3's

    stage(project, "base")
    stage(project, "train")
    train = json.loads((project / "metrics/train.json").read_text())
    assert train["cut_rows"] == 0 and train["trained_with"]["image"] == params["image"]
    modules = train["trainable_modules"]
    assert set(modules) == {"lora:language_model", "lora:vision_tower", "multi_modal_projector"}
    assert sum(modules.values()) == train["trainable_params"]

    stage(project, "merge", "--samples", "1", "--max-new-tokens", "4")
    merge = json.loads((project / "metrics/merge.json").read_text())
    assert merge["passed"] is True and merge["image"] == gemma3_image and merge["dtype"] == "bfloat16"
    assert merge["family"] == "gemma3" and set(gemma3_image) == set(gemma3.IMAGE_SETTINGS)
    recorded = json.loads((project / "models/merged/processor_config.json").read_text())["image_processor"]
    assert {k: recorded[k] for k in gemma3_image} == gemma3_image   # the settings travel with the model

    stage(project, "evaluate", "--model-dir", "models/merged", "--engine", "transformers", "--data-file",
          "data/input/ocr_test.json", "--output-file", "results/finetuned.json", "--max-tokens", "4",
          "--workers", "1", timeout=300)
    result = json.loads((project / "results/finetuned.json").read_text())
    assert result["status"] == "complete" and result["total_samples"] == 2
    collator = OcrCollator(load_processor(real_base, params["image"]), DEFAULT_INSTRUCTION)
    for sample, row in zip(result["samples"], pages[6:]):
        encoded = collator.encode(row)
        image_tokens = int((encoded["token_type_ids"][:encoded["prompt_length"]] == 1).sum())
        assert image_tokens == 256 * (1 + crops)                    # what the settings say
        assert sample["prompt_tokens"] == encoded["prompt_length"]   # the server read what training read

    stage(project, "score", "--input", "results/finetuned.json", "--output", "scored/finetuned.json")
    scored = json.loads((project / "scored/finetuned.json").read_text())
    assert scored["total_samples"] == 2 and scored["overall_cer"] is not None
