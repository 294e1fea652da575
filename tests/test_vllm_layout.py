"""The merged folder in the layout vLLM's Gemma 3 loader reads (real google/gemma-3-*-it checkpoints):
language_model.model.*, multi_modal_projector.*, vision_tower.vision_model.* without the SigLIP
pooling head, vision_use_head false, and Gemma's newline tokens in the tokenizer.

vLLM itself is not run here (its CPU build runs Gemma 3's image tokens causally); the layout and
config are checked on real folders, and every folder is reloaded by transformers with no missing
or unexpected keys."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from stages.lib.families.gemma3 import layout_problems, real_key, write_real_layout

ROOT = Path(__file__).resolve().parents[1]
REAL_PREFIXES = {"language_model.model", "multi_modal_projector", "vision_tower.vision_model"}


def saved_keys(folder):
    keys = []
    for shard in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys += list(f.keys())
    return keys


def prefixes(keys):
    """'vision_tower.vision_model' / 'language_model.model' / 'multi_modal_projector' of each key."""
    return {".".join(k.split(".")[:2]) if not k.startswith("multi_modal_projector") else "multi_modal_projector"
            for k in keys}


def assert_real_layout(folder):
    keys = saved_keys(folder)
    assert prefixes(keys) == REAL_PREFIXES, sorted(prefixes(keys))
    assert not [k for k in keys if ".head." in k or k.startswith(("model.", "lm_head."))]
    config = json.loads((Path(folder) / "config.json").read_text())
    assert config["vision_config"]["vision_use_head"] is False
    assert config["architectures"] == ["Gemma3ForConditionalGeneration"]
    assert layout_problems(folder) == []


def reload_info(folder):
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), output_loading_info=True)
    return model, {k: v for k, v in info.items() if v}


def image_logits(model, processor):
    from PIL import Image

    from stages.lib.prompt import DEFAULT_INSTRUCTION, generation_prompt

    image = Image.new("RGB", (128, 128), "white")
    image.paste((0, 0, 0), (20, 40, 100, 80))
    inputs = processor(text=[generation_prompt(processor, DEFAULT_INSTRUCTION)], images=[[image]],
                       return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def default_layout_dir(tiny_base_dir, tmp_path_factory):
    """The tiny model as transformers 5.x saves a Gemma 3 built from a config: vision_tower.embeddings...,
    a SigLIP head (vision_use_head true). What `write_real_layout` must turn into the real layout."""
    from transformers import AutoProcessor, Gemma3Config, Gemma3ForConditionalGeneration

    out = tmp_path_factory.mktemp("default") / "model"
    config = Gemma3Config.from_pretrained(str(tiny_base_dir))
    config.vision_config.vision_use_head = True
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():   # the tiny base's trained weights; the head stays random (Gemma 3 never uses it)
        model.load_state_dict(Gemma3ForConditionalGeneration.from_pretrained(str(tiny_base_dir)).state_dict(),
                              strict=False)
    model.save_pretrained(str(out))
    AutoProcessor.from_pretrained(str(tiny_base_dir)).save_pretrained(str(out))
    return out


def test_transformers_default_save_is_not_the_real_layout(default_layout_dir):
    keys = saved_keys(default_layout_dir)
    assert any(k.startswith("vision_tower.embeddings.") for k in keys)
    assert any(k.startswith("vision_tower.head.") for k in keys)
    problems = layout_problems(default_layout_dir)
    assert any("vision_use_head" in p for p in problems) and any("outside the real layout" in p for p in problems)


def test_key_names_of_the_real_layout():
    assert real_key("model.language_model.layers.0.mlp.up_proj.weight", True) == \
        "language_model.model.layers.0.mlp.up_proj.weight"
    assert real_key("model.vision_tower.encoder.layers.1.mlp.fc1.weight", True) == \
        "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    assert real_key("vision_tower.embeddings.patch_embedding.weight", True) == \
        "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert real_key("vision_tower.vision_model.post_layernorm.bias", True) == "vision_tower.vision_model.post_layernorm.bias"
    assert real_key("model.multi_modal_projector.mm_input_projection_weight", True) == \
        "multi_modal_projector.mm_input_projection_weight"
    assert real_key("vision_tower.head.probe", True) is None
    assert real_key("lm_head.weight", True) is None and real_key("lm_head.weight", False) == "language_model.lm_head.weight"


@pytest.mark.parametrize("shard_size", [None, "300KB"])
def test_rewritten_folder_reloads_with_the_same_outputs(default_layout_dir, tmp_path, shard_size):
    """One file or sharded (index rewritten): real layout, no missing/unexpected keys, same logits."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = tmp_path / "model"
    before = AutoModelForImageTextToText.from_pretrained(str(default_layout_dir))
    before.save_pretrained(str(folder), **({"max_shard_size": shard_size} if shard_size else {}))
    processor = AutoProcessor.from_pretrained(str(default_layout_dir))
    processor.save_pretrained(str(folder))
    if shard_size:
        assert len(list(folder.glob("*.safetensors"))) > 1
    result = write_real_layout(folder)
    assert result["renamed"] > 0 and result["dropped"] and all(".head." in k for k in result["dropped"])
    with open(folder / "config.json") as f:   # written whole: json, not a temp file left
        json.load(f)
    assert not list(folder.glob("*.tmp"))
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]
    (folder / "config.json").write_text(json.dumps(config))
    assert_real_layout(folder)
    if shard_size:
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(saved_keys(folder))
        assert all((folder / name).is_file() for name in index["weight_map"].values())
    after, info = reload_info(folder)
    assert info == {}
    assert torch.equal(image_logits(before, processor), image_logits(after, processor))
    assert write_real_layout(folder) == {"renamed": 0, "dropped": []}   # idempotent


def test_tiny_base_mirrors_real_gemma3(tiny_base_dir):
    from transformers import AutoTokenizer

    assert_real_layout(tiny_base_dir)
    assert reload_info(tiny_base_dir)[1] == {}
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    assert tokenizer.tokenize("a\n\nb\n\n\nc\n\n\n\nd\ne") == ["a", "\n\n", "b", "\n\n\n", "c", "\n\n\n\n", "d", "\n", "e"]


def stage(project, name, *args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-m", f"stages.{name}", *args], cwd=project, capture_output=True,
                          text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_base_train_merge_on_a_real_layout_checkpoint(default_layout_dir, tiny_rows, tmp_path):
    """model_name = a checkpoint folder saved in the real layout: base -> train -> merge give a merged
    folder in that layout, which transformers reloads with no missing or unexpected keys."""
    checkpoint = tmp_path / "gemma-3-tiny-it"   # what a user downloads: the real layout
    from transformers import AutoModelForImageTextToText, AutoProcessor

    AutoModelForImageTextToText.from_pretrained(str(default_layout_dir)).save_pretrained(str(checkpoint))
    AutoProcessor.from_pretrained(str(default_layout_dir)).save_pretrained(str(checkpoint))
    write_real_layout(checkpoint)
    assert_real_layout(checkpoint)

    project = tmp_path / "project"
    (project / "data" / "input").mkdir(parents=True)
    (project / "data" / "input" / "ocr_non_test.json").write_text(json.dumps(tiny_rows[:24], ensure_ascii=False))
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params.update(model_name=str(checkpoint), num_train_epochs=4, per_device_train_batch_size=4, eval_steps=5,
                  logging_steps=1, val_ratio=0.2)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")

    stage(project, "base")
    assert json.loads((project / "models/base/source.json").read_text())["model_name"] == str(checkpoint.resolve())
    stage(project, "train")
    merged = stage(project, "merge", "--samples", "2", "--max-new-tokens", "8")
    folder = project / "models" / "merged"
    assert_real_layout(folder)
    assert reload_info(folder)[1] == {}
    metrics = json.loads((project / "metrics" / "merge.json").read_text())
    assert metrics["passed"] is True and metrics["layout"]["dropped"] == [] and metrics["family"] == "gemma3"
    assert "greedy identical" in merged.stdout


def test_merge_writes_the_real_layout_from_a_base_saved_otherwise(default_layout_dir, tiny_rows_file, tmp_path):
    """A base in transformers' default layout, SigLIP head included: the merge drops the head (Gemma 3
    never reads it; parity proves the outputs unchanged) and writes the real layout."""
    from test_merge import make_adapter, run_stage

    adapter = make_adapter(default_layout_dir, tmp_path / "lora")
    out, metrics = run_stage(tmp_path, default_layout_dir, adapter, tiny_rows_file)
    metrics = json.loads(metrics.read_text())
    assert metrics["passed"] is True and metrics["greedy_mismatches"] == 0
    assert metrics["layout"]["renamed"] > 0
    assert metrics["layout"]["dropped"] and all("head" in k for k in metrics["layout"]["dropped"])
    assert_real_layout(out)
    assert reload_info(out)[1] == {}
