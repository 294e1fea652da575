"""Model families (stages/lib/families/): chosen from config.json model_type, one module each.

Gemma 4 and Qwen3-VL are checked here as far as this CPU machine allows: their tiny models build
offline with the real processor settings, LoRA reaches both towers through the family's names,
the merge writes the key layout vLLM 0.33.0's loader for the family places (its weight-name
mapping, copied from its source: tools/check_vllm_mappings.py compares them), and the merged folder
reloads strictly with the merged weights. Their processors (with a torchvision video processor) load
from the saved folders. Every family goes end to end through DVC in test_family_pipeline.py;
Gemma 3 also in test_workflow.py and test_vllm_layout.py.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from stages.lib.cli import UserError
from stages.lib.families import (FAMILIES, family_image_settings, family_of, gemma3, gemma4, qwen3_vl,
                                 resolution_settings, tiny, vllm_layout)
from stages.lib.synthetic import charset

ROOT = Path(__file__).resolve().parents[1]
ALL_ON = {"finetune_vision_layers": True, "finetune_language_layers": True,
          "finetune_attention_modules": True, "finetune_mlp_modules": True}
NEW = (gemma4, qwen3_vl)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """A tiny untrained model of each new family, built offline."""
    out = {}
    for family in NEW:
        out[family.MODEL_TYPE] = family.build_tiny(tmp_path_factory.mktemp(family.MODEL_TYPE) / "model", charset())
    return out


def test_family_of_each_tiny_model(tiny_dirs, tiny_base_dir):
    assert family_of(tiny_base_dir) is gemma3
    for family in NEW:
        assert family_of(tiny_dirs[family.MODEL_TYPE]) is family
    assert set(FAMILIES) == {"gemma3", "gemma4", "qwen3_vl"}


def test_an_unsupported_model_type_is_one_line_naming_it_and_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(UserError) as err:
        family_of(tmp_path)
    message = str(err.value)
    assert "'llava'" in message and "gemma3, gemma4, qwen3_vl" in message and "\n" not in message


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_tiny_model_has_the_family_architecture_and_real_processor_settings(tiny_dirs, family):
    folder = tiny_dirs[family.MODEL_TYPE]
    config = json.loads((folder / "config.json").read_text())
    assert config["architectures"] == [family.ARCHITECTURE]
    saved = json.loads((folder / "processor_config.json").read_text())
    image = saved["image_processor"]
    if family is gemma4:   # patch 16, 3x3 pooling, a supported soft-token budget
        assert (image["patch_size"], image["pooling_kernel_size"], image["max_soft_tokens"]) == (16, 3, 70)
        assert image["max_soft_tokens"] in gemma4.SOFT_TOKEN_BUDGETS and saved["image_seq_length"] == 70
    else:                  # patch 16, 2x2 merge, temporal patch 2, a pixel range
        assert (image["patch_size"], image["merge_size"], image["temporal_patch_size"]) == (16, 2, 2)
        assert image["size"] == {"shortest_edge": 128 * 128, "longest_edge": 256 * 256}
    assert saved["processor_class"] == family.ARCHITECTURE.replace("ForConditionalGeneration", "Processor")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    for token in family.STOP_TOKENS:   # a single special token, as in the real tokenizers
        assert tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id)
        assert tokenizer.tokenize(token) == [token]
    # the family's chat template ends an answer with its stop token
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "x"}, {"role": "assistant", "content": "42"}],
                                         tokenize=False)
    assert f"42{family.STOP_TOKENS[0]}" in chat


def real_shaped_checkpoint(source, folder, family):
    """A folder shaped like the family's published checkpoint: the tiny model's config and weights,
    the processor files with the published resolution settings (Gemma 3: preprocessor_config.json
    at 896 px and pan-and-scan settings unset; Gemma 4: processor_config.json with the image
    processor nested, transformers' Gemma4ImageProcessor defaults; Qwen3-VL: preprocessor_config.json
    with size.shortest_edge / longest_edge)."""
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(source / name, folder / name)
    if family is gemma3:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
            "size": {"height": 896, "width": 896}, "image_seq_length": 256, "do_pan_and_scan": None,
            "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
            "pan_and_scan_min_ratio_to_activate": None, "image_mean": [0.5] * 3, "image_std": [0.5] * 3}))
        (folder / "processor_config.json").write_text(json.dumps({"image_seq_length": 256,
                                                                  "processor_class": "Gemma3Processor"}))
    elif family is gemma4:
        from transformers import Gemma4AudioFeatureExtractor, Gemma4ImageProcessorPil, Gemma4VideoProcessor

        image = {**tiny.settings_of(Gemma4ImageProcessorPil()), "image_processor_type": "Gemma4ImageProcessor"}
        (folder / "processor_config.json").write_text(json.dumps({
            "feature_extractor": tiny.settings_of(Gemma4AudioFeatureExtractor()), "image_processor": image,
            "video_processor": tiny.settings_of(Gemma4VideoProcessor()),
            "image_seq_length": 280, "processor_class": "Gemma4Processor"}))
    else:
        (folder / "preprocessor_config.json").write_text(json.dumps({
            "size": {"longest_edge": 16777216, "shortest_edge": 65536}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3,
            "image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor"}))
        (folder / "video_preprocessor_config.json").write_text(json.dumps({
            "size": {"longest_edge": 25165824, "shortest_edge": 4096}, "patch_size": 16, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "fps": 2,
            "video_processor_type": "Qwen3VLVideoProcessor", "processor_class": "Qwen3VLProcessor"}))
    return folder


def run_base(project, model_name, **base):
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    params["model_name"] = str(model_name)
    params["base"].update(base)
    project.mkdir(parents=True, exist_ok=True)
    (project / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True), encoding="utf-8")
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "stages.base"], cwd=project, capture_output=True, text=True,
                          timeout=300, env=env)


EXPECTED = {
    "gemma3": {"do_pan_and_scan": None, "pan_and_scan_max_num_crops": None, "pan_and_scan_min_crop_size": None,
               "pan_and_scan_min_ratio_to_activate": None},
    "gemma4": {"max_soft_tokens": 280},
    "qwen3_vl": {"size": {"longest_edge": 16777216, "shortest_edge": 65536}},
}


def test_model_name_at_a_real_shaped_checkpoint_resolves_family_and_resolution(tiny_dirs, tiny_base_dir, tmp_path):
    """model_name = a checkpoint folder of each family: the base stage names the family and its
    resolution settings from the folder alone (metrics/base.json), with no further params, and the
    family's Processor loads from it with those settings."""
    from stages.lib.modeling import load_processor

    sources = {"gemma3": Path(tiny_base_dir), **tiny_dirs}
    for name, family in FAMILIES.items():
        checkpoint = real_shaped_checkpoint(sources[name], tmp_path / f"{name}-it", family)
        assert family_of(checkpoint) is family and resolution_settings(checkpoint) == EXPECTED[name]
        done = run_base(tmp_path / f"project-{name}", checkpoint)
        assert done.returncode == 0, done.stderr[-2000:]
        metrics = json.loads((tmp_path / f"project-{name}" / "metrics/base.json").read_text())
        assert metrics["family"] == name and metrics["resolution"] == EXPECTED[name], metrics
        assert family.TITLE in done.stdout
        processor = load_processor(checkpoint)   # the family's Processor, from the folder's files alone
        assert type(processor).__name__ == family.ARCHITECTURE.replace("ForConditionalGeneration", "Processor")
        for key, value in EXPECTED[name].items():
            if value is not None:
                found = getattr(processor.image_processor, key)
                assert (dict(found) if isinstance(value, dict) else found) == value, (name, key, found)


def test_a_checkpoint_without_its_video_processor_settings_is_one_line(tiny_dirs, tmp_path):
    """A Gemma 4 folder whose processor_config.json lacks the video processor (an older or hand-copied
    file): transformers' many-line OSError becomes one line naming the folder and the files to copy."""
    from stages.lib.modeling import load_processor

    checkpoint = real_shaped_checkpoint(tiny_dirs["gemma4"], tmp_path / "gemma4", gemma4)
    saved = json.loads((checkpoint / "processor_config.json").read_text())
    del saved["video_processor"]
    (checkpoint / "processor_config.json").write_text(json.dumps(saved))
    with pytest.raises(UserError) as err:
        load_processor(checkpoint)
    message = str(err.value)
    assert str(checkpoint) in message and "video_preprocessor_config.json" in message and "\n" not in message


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_base_builds_and_pretrains_the_tiny_model_of_base_family(family, tiny_rows_file, tmp_path):
    """model_name "tiny" with base.family: the base stage builds that family's tiny model (white paper
    in as 0, the demo's scaling) and pre-trains it (a few steps here; README: the learning figures)."""
    from stages.lib.modeling import load_processor

    project = tmp_path / "project"
    (project / "data" / "input").mkdir(parents=True)
    shutil.copy(tiny_rows_file, project / "data/input/ocr_non_test.json")
    done = run_base(project, "tiny", family=family.MODEL_TYPE, pretrain_lines=40, pretrain_steps=3,
                    pretrain_batch_size=4, text_hidden_size=64, vision_hidden_size=32)
    assert done.returncode == 0, done.stderr[-2000:]
    metrics = json.loads((project / "metrics/base.json").read_text())
    assert metrics["family"] == family.MODEL_TYPE and metrics["pretrain_steps"] == 3
    assert metrics["pretrain_loss"] < metrics["pretrain_first_loss"] + 1.0 and f"tiny {family.TITLE}" in done.stdout
    assert family_of(project / "models/base") is family and family.layout_problems(project / "models/base") == []
    image = load_processor(project / "models/base").image_processor
    features = image(Image.new("RGB", (128, 128), "white"), return_tensors="pt")
    white = features["pixel_values"]
    if family is gemma4:   # the model itself maps x to 2 * (x - 0.5); padding patches have position -1
        white = 2 * (white[features["image_position_ids"][..., 0] >= 0] - 0.5)
    assert float(white.abs().max()) < 1e-6


def test_base_refuses_an_unsupported_model_type_in_one_line(tiny_base_dir, tmp_path):
    checkpoint = tmp_path / "llava-tiny"
    shutil.copytree(tiny_base_dir, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
    done = run_base(tmp_path / "project", checkpoint)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "'llava'" in lines[0] and "supported: gemma3, gemma4, qwen3_vl" in lines[0], lines
    assert not (tmp_path / "project" / "models" / "base").exists()


def test_image_tokens_follow_the_resolution_settings():
    """The prompt-length bound (modeling.prompt_length) per family: Gemma 3 per crop, Gemma 4 the
    soft-token budget, Qwen3-VL max pixels (size.longest_edge) / 32^2."""
    assert gemma3.image_tokens({"mm_tokens_per_image": 256}, {"do_pan_and_scan": None}) == 256
    assert gemma3.image_tokens({"mm_tokens_per_image": 256},
                               {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4}) == 256 * 5
    assert gemma4.image_tokens({}, {"max_soft_tokens": 1120}) == 1120
    assert qwen3_vl.image_tokens({}, {"size": {"shortest_edge": 65536, "longest_edge": 1024 * 1024}}) == 1024


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_the_family_processor_loads_with_its_video_processor(tiny_dirs, family):
    """The CPU set installs torchvision (tools/setup.sh), so the family's Processor class loads as
    saved, its torchvision-built video processor included, and expands the image token."""
    from stages.lib.modeling import load_processor

    processor = load_processor(tiny_dirs[family.MODEL_TYPE])
    assert type(processor).__name__ == json.loads(
        (tiny_dirs[family.MODEL_TYPE] / "processor_config.json").read_text())["processor_class"]
    assert processor.video_processor is not None


# ---------------------------------------------------------------- LoRA, merge and the vLLM layout

def lora_model(folder, family):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from stages.lib.training import lora_targets

    model = AutoModelForImageTextToText.from_pretrained(str(folder))
    targets = lora_targets(model, ALL_ON, family)
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=list(family.MODULES_TO_SAVE),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():   # the fully trained projector moves too, as training would move it
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(0.01)
    return peft_model, targets


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_lora_reaches_both_towers_and_the_projector(tiny_dirs, family):
    peft_model, targets = lora_model(tiny_dirs[family.MODEL_TYPE], family)
    assert any(f".{family.VISION_TOWER}." in t for t in targets)
    assert any(f".{family.LANGUAGE_MODEL}." in t for t in targets)
    assert not [t for t in targets if any(f".{m}." in f".{t}." for m in family.MODULES_TO_SAVE)]
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any("modules_to_save" in n for n in trainable)
    only_vision = lora_targets_with(tiny_dirs[family.MODEL_TYPE], family, finetune_language_layers=False)
    assert only_vision and all(f".{family.VISION_TOWER}." in t for t in only_vision)


def lora_targets_with(folder, family, **flags):
    from transformers import AutoModelForImageTextToText

    from stages.lib.training import lora_targets

    return lora_targets(AutoModelForImageTextToText.from_pretrained(str(folder)), {**ALL_ON, **flags}, family)


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_merged_folder_is_in_the_vllm_layout_and_reloads_strictly(tiny_dirs, family, tmp_path):
    """peft's merge (what the merge stage does) saved, the family's layout written and checked against
    vLLM 0.33.0's mapping; the folder reloads with no missing or unexpected keys and holds exactly the
    merged weights, which differ from the base's in both towers and the projector."""
    from safetensors.torch import load_file

    from stages.lib.merging import load_base

    base_dir = tiny_dirs[family.MODEL_TYPE]
    base = load_file(str(base_dir / "model.safetensors"))
    peft_model, _ = lora_model(base_dir, family)
    merged = peft_model.merge_and_unload()
    out = tmp_path / "merged"
    merged.save_pretrained(str(out))
    assert family.write_layout(out) == {"renamed": 0, "dropped": []}
    assert family.layout_problems(out) == []
    assert family_of(out) is family
    reloaded = load_base(out, torch.float32, strict=True)
    saved = load_file(str(out / "model.safetensors"))
    state = reloaded.state_dict()
    for key, value in merged.state_dict().items():
        if key in saved:
            assert torch.equal(state[key], value), key
    changed = {k for k in saved if k in base and not torch.equal(saved[k], base[k])}
    for part in (f".{family.VISION_TOWER}.", f".{family.LANGUAGE_MODEL}.", f".{family.MODULES_TO_SAVE[0]}."):
        assert any(part in f".{k}" for k in changed), (part, sorted(changed)[:5])


@pytest.mark.parametrize("family", FAMILIES.values(), ids=lambda f: f.MODEL_TYPE)
def test_a_tensor_outside_the_layout_is_reported(tiny_dirs, tiny_base_dir, family, tmp_path):
    from safetensors.torch import load_file, save_file

    source = Path(tiny_base_dir) if family is gemma3 else tiny_dirs[family.MODEL_TYPE]
    folder = tmp_path / "model"
    shutil.copytree(source, folder)
    assert family.layout_problems(folder) == [] and vllm_layout.unplaced_keys(family, vllm_layout.saved_keys(folder)) == []
    weights = load_file(str(folder / "model.safetensors"))
    key = next(iter(weights))
    weights["extra." + key] = weights.pop(key)   # a name vLLM's loader for the family has no place for
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert family.layout_problems(folder), key
    assert vllm_layout.unplaced_keys(family, vllm_layout.saved_keys(folder)) == [f"extra.{key}"]


def test_vllm_mapping_is_applied_as_vllm_applies_it():
    """vLLM's WeightsMapper applies every matching prefix in order (Gemma 4's last rule, 'model' ->
    'language_model.model', must not touch a name an earlier rule already mapped)."""
    assert vllm_layout.unplaced_keys(gemma4, ["model.vision_tower.encoder.layers.0.mlp.up_proj.linear.weight",
                                       "model.embed_vision.embedding_projection.weight",
                                       "model.language_model.layers.0.self_attn.q_proj.weight"]) == []
    assert vllm_layout.unplaced_keys(qwen3_vl, ["model.visual.blocks.0.attn.qkv.weight", "lm_head.weight",
                                         "model.language_model.norm.weight", "model.mm_projector.weight"]) == \
        ["model.mm_projector.weight"]
    assert vllm_layout.unplaced_keys(gemma3, ["vision_tower.embeddings.patch_embedding.weight"]) == \
        ["vision_tower.embeddings.patch_embedding.weight"]


def test_each_family_takes_its_own_image_settings():
    """params.yaml `image:` holds every family's settings side by side: a model takes its family's
    (nulls keep the checkpoint's), a name of no family is one line."""
    image = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4, "max_soft_tokens": 560, "size": None}
    assert family_image_settings(gemma3, image) == {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4}
    assert family_image_settings(gemma4, image) == {"max_soft_tokens": 560}
    assert family_image_settings(qwen3_vl, image) == {}
    assert family_image_settings(qwen3_vl, None) == {}
    with pytest.raises(UserError) as err:
        family_image_settings(gemma4, {"max_pixels": 1000})
    assert "'image.max_pixels'" in str(err.value) and "max_soft_tokens" in str(err.value)
    params = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))["image"]
    for family in FAMILIES.values():   # the default params.yaml names every family's settings
        assert set(family.IMAGE_SETTINGS) <= set(params), family.MODEL_TYPE
        family_image_settings(family, params)


def test_prompt_length_counts_the_image_settings(tiny_base_dir, tiny_dirs):
    from transformers import AutoTokenizer

    from stages.lib.modeling import prompt_length

    folder = tiny_dirs["gemma4"]
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    assert prompt_length(folder, tokenizer, "x", {"max_soft_tokens": 1120}) - prompt_length(folder, tokenizer, "x") \
        == 1120 - 70
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_base_dir))
    on = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 2}
    assert prompt_length(tiny_base_dir, tokenizer, "x", on) - prompt_length(tiny_base_dir, tokenizer, "x") == 2 * 16


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_the_chat_template_writes_the_answer_after_the_generation_prompt(tiny_dirs, family):
    """What OcrCollator relies on (training's loss mask = the tokens after the generation prompt): the
    family's template, with the project's own user turn, renders prompt + answer as the prompt followed
    by the answer and the family's stop token; the image placeholder is the family's image token."""
    from transformers import AutoTokenizer

    from stages.lib.prompt import DEFAULT_INSTRUCTION, user_turn

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dirs[family.MODEL_TYPE]))
    turn = user_turn(DEFAULT_INSTRUCTION)
    prompt = tokenizer.apply_chat_template([turn], add_generation_prompt=True, tokenize=False)
    full = tokenizer.apply_chat_template([turn, {"role": "assistant", "content": [{"type": "text", "text": "AB12"}]}],
                                         tokenize=False)
    assert full.startswith(prompt) and full[len(prompt):].startswith(f"AB12{family.STOP_TOKENS[0]}")
    assert tokenizer.image_token in prompt and prompt.index(tokenizer.image_token) < prompt.index(DEFAULT_INSTRUCTION)


# ---------------------------------------------------------------- reading images through the family's Processor

def image_inputs(folder, family, row, answer=False):
    """Model inputs for one split row as training builds them: the family's own Processor (loaded from
    the folder, torchvision's video processor included) through OcrCollator, the prompt with the image
    tokens expanded by the Processor. With `answer`: the row's text and stop token appended, labels on
    them only."""
    from stages.lib.modeling import load_processor
    from stages.lib.prompt import DEFAULT_INSTRUCTION
    from stages.lib.training import OcrCollator

    collator = OcrCollator(load_processor(folder), DEFAULT_INSTRUCTION)
    if answer:
        batch = collator([row])
        return batch, batch.pop("labels")
    inputs = collator.processor(text=[collator.prompt], images=[[collator.read_image(row)]], return_tensors="pt",
                                add_special_tokens=False)
    return dict(inputs)


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_the_merged_folder_reads_an_image_like_base_plus_adapter(tiny_dirs, tiny_rows, family, tmp_path):
    """The merge's parity on an image: the merged folder, reloaded strictly, gives the logits of the
    unmerged base + adapter; the vision LoRA alone moves them far more (an unmerged vision tower
    would not pass unnoticed)."""
    from stages.lib.merging import load_base, vision_lora_off

    folder = tiny_dirs[family.MODEL_TYPE]
    inputs = image_inputs(folder, family, tiny_rows[0])
    peft_model, _ = lora_model(folder, family)
    peft_model.eval()
    with torch.no_grad():
        reference = peft_model(**inputs).logits
        with vision_lora_off(peft_model, family.VISION_TOWER) as layers:
            without_vision = peft_model(**inputs).logits
    assert layers > 0
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(tmp_path / "merged"))
    family.write_layout(tmp_path / "merged")
    with torch.no_grad():
        logits = load_base(tmp_path / "merged", torch.float32, strict=True)(**inputs).logits
    scale = reference.abs().max().item()
    gap, vision_effect = (logits - reference).abs().max().item() / scale, \
        (without_vision - reference).abs().max().item() / scale
    assert gap < 1e-4 and vision_effect > 100 * gap, (gap, vision_effect)


@pytest.mark.parametrize("family", NEW, ids=lambda f: f.MODEL_TYPE)
def test_lora_training_on_images_lowers_the_loss(tiny_dirs, tiny_rows, family):
    """A few AdamW steps of LoRA (the family's targets and projector) on rendered lines, loss on the
    answer only: the loss falls. The tiny model is untrained; this shows the training path reaches
    the family's model through its image inputs (test_family_pipeline.py shows a pre-trained one reads)."""
    folder = tiny_dirs[family.MODEL_TYPE]
    batch = [image_inputs(folder, family, r, answer=True) for r in tiny_rows[:4]]
    peft_model, _ = lora_model(folder, family)
    peft_model.train()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    losses = []
    for _ in range(15):
        total = 0.0
        for inputs, labels in batch:
            loss = peft_model(**inputs, labels=labels).loss
            loss.backward()
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / len(batch))
    assert losses[-1] < 0.95 * losses[0] and losses[5] < losses[0], losses
