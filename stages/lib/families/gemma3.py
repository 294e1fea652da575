"""Gemma 3 (google/gemma-3-*-it, model_type gemma3): the default family.

Image: fixed square resize (896 px on real checkpoints, 256 soft tokens), optional pan-and-scan
crops for pages (the four settings below; vLLM takes the same names in --mm-processor-kwargs:
vllm/model_executor/models/gemma3_mm.py reads them from images_kwargs). Key layout: the real
checkpoints' (below), which vLLM 0.33.0's gemma3_mm.py maps with
hf_to_vllm_mapper below. The tiny model: stages/lib/tinymodel.py.
"""
import json
import os
import sys
from pathlib import Path

from ..cli import UserError
from . import vllm_layout

MODEL_TYPE = "gemma3"
TITLE = "Gemma 3"
ARCHITECTURE = "Gemma3ForConditionalGeneration"
STOP_TOKENS = ("<end_of_turn>",)
VISION_TOWER, LANGUAGE_MODEL = "vision_tower", "language_model"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")   # SigLIP: out_proj
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")         # SigLIP: fc1, fc2
LINEAR_WRAPPED = ""
# A bare parameter (mm_input_projection_weight): LoRA cannot reach it, so it trains fully.
MODULES_TO_SAVE = ("multi_modal_projector",)
IMAGE_SETTINGS = {
    "do_pan_and_scan": "crop pages into tiles beside the whole image (each crop: mm_tokens_per_image more tokens)",
    "pan_and_scan_max_num_crops": "most crops per image",
    "pan_and_scan_min_crop_size": "smallest crop side in pixels",
    "pan_and_scan_min_ratio_to_activate": "aspect ratio from which an image is cropped",
}
# vLLM 0.33.0 vllm/model_executor/models/gemma3_mm.py, Gemma3ForConditionalGeneration.hf_to_vllm_mapper
VLLM_WEIGHT_PREFIXES = (
    ("model.language_model.", "language_model.model."),
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)
# its modules (self.vision_tower = SiglipVisionModel, whose weights are vision_model.*)
VLLM_MODULES = ("language_model.model.", "language_model.lm_head.", "multi_modal_projector.",
                "vision_tower.vision_model.")
CHAT_TEMPLATE = "gemma3.jinja"
UNSLOTH = "FastVisionModel.from_pretrained (unsloth 2026.10.9 lists gemma3)"


def saved_setting(saved, name):
    return saved.get(name)


def image_tokens(config, settings):
    """mm_tokens_per_image for the whole image, and as much again per pan-and-scan crop."""
    per_image = config.get("mm_tokens_per_image") or 256
    crops = settings.get("pan_and_scan_max_num_crops") or 0 if settings.get("do_pan_and_scan") else 0
    return per_image * (1 + crops)


def build_tiny(output_dir, alphabet, *, seed=0, white_is_zero=False, **sizes):
    """The tiny Gemma 3 (stages/lib/tinymodel.py). white_is_zero: mean/std 1, white paper in as 0 (the
    demo base's scaling); else Gemma 3's real 0.5."""
    from ..tinymodel import build_tiny_model

    return build_tiny_model(output_dir, alphabet, seed=seed, norm=1.0 if white_is_zero else 0.5, **sizes)


def write_layout(folder):
    return write_real_layout(folder)


# ---------------------------------------------------------------- the real checkpoints' layout
# The folder layout of real Gemma 3 checkpoints (google/gemma-3-*-it), which vLLM's Gemma 3
# loader expects, written whatever the installed transformers saves by default.
#
# Real checkpoints store
#     language_model.model.*        (the text decoder; no lm_head: it is tied to the embeddings)
#     multi_modal_projector.*
#     vision_tower.vision_model.*   (SigLIP without its pooling head: config vision_use_head false)
# and their tokenizer has Gemma's newline tokens "\\n\\n", "\\n\\n\\n", "\\n\\n\\n\\n" (vLLM's Gemma 3
# processor looks them up by name). transformers 5.24 saves a Gemma 3 built from a config as
# `vision_tower.embeddings...` with a `vision_tower.head.*` (a spike found vLLM refusing both);
# loaded from the real layout, it reads and re-saves the real layout with no missing keys.
# Gemma 3 never uses the head (the projector reads the tower's last hidden state), so dropping it
# changes no output; merge's parity check proves that on every merge.

NEWLINE_TOKENS = ("\n\n", "\n\n\n", "\n\n\n\n")
# transformers' in-memory names -> the real checkpoints' names, first match wins: vLLM's own mapping.
PREFIXES = VLLM_WEIGHT_PREFIXES
VISION = "vision_tower."
REAL_PREFIXES = VLLM_MODULES
INDEX = "model.safetensors.index.json"


def real_key(key, tied):
    """The key's name in the real layout, or None for tensors real checkpoints do not have
    (the SigLIP pooling head; lm_head when it is tied to the embeddings)."""
    for old, new in PREFIXES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    if key.startswith(VISION):
        rest = key[len(VISION):]
        rest = rest[len("vision_model."):] if rest.startswith("vision_model.") else rest
        if rest.startswith("head."):
            return None
        key = f"{VISION}vision_model.{rest}"
    if key.startswith("language_model.lm_head.") and tied:
        return None
    return key


def _tied(config):
    text = config.get("text_config") or {}
    return bool(config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))


def _atomic_json(path, doc):
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def write_real_layout(folder):
    """Rewrite a Gemma 3 folder's safetensors (every shard, and the index) and config.json in the
    real checkpoints' layout, in place; files already in it are left untouched.
    Returns {"renamed": n, "dropped": [keys]}."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder = Path(folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "gemma3":
        raise UserError(f"{folder}: model_type {config.get('model_type')!r} is not gemma3 (the multimodal Gemma 3)")
    tied = _tied(config)
    renamed, dropped, new_names = 0, [], {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            keys, metadata = list(f.keys()), f.metadata() or {}
            names = {key: real_key(key, tied) for key in keys}
            if all(names[k] == k for k in keys):
                new_names.update((k, shard.name) for k in keys)
                continue
            tensors = {names[k]: f.get_tensor(k) for k in keys if names[k] is not None}
        renamed += sum(1 for k in keys if names[k] not in (None, k))
        dropped += [k for k in keys if names[k] is None]
        tmp = shard.with_name(shard.name + ".tmp")
        save_file(tensors, str(tmp), metadata={**metadata, "format": "pt"})
        os.replace(tmp, shard)
        new_names.update((k, shard.name) for k in tensors)
        del tensors
    index_path = folder / INDEX
    if index_path.is_file():
        index = json.loads(index_path.read_text(encoding="utf-8"))
        index["weight_map"] = dict(sorted(new_names.items()))
        _atomic_json(index_path, index)
    config.setdefault("vision_config", {})["vision_use_head"] = False
    _atomic_json(config_path, config)
    return {"renamed": renamed, "dropped": dropped}


def layout_problems(folder):
    """What in a model folder differs from the real Gemma 3 layout vLLM loads: [] when nothing."""
    from safetensors import safe_open
    from transformers import AutoTokenizer

    folder = Path(folder)
    problems = []
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if config.get("model_type") != "gemma3":
        problems.append(f"model_type {config.get('model_type')!r}, not gemma3")
    if (config.get("vision_config") or {}).get("vision_use_head", True):
        problems.append("vision_config.vision_use_head is not false")
    keys = []
    for shard in folder.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:   # reads the header only
            keys += list(f.keys())
    odd = sorted(k for k in keys if not k.startswith(REAL_PREFIXES) or real_key(k, _tied(config)) != k)
    if odd:
        problems.append(f"{len(odd)} tensors outside the real layout (first: {odd[0]})")
    vocab = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False).get_vocab()
    missing = [t.replace("\n", "\\n") for t in NEWLINE_TOKENS if t not in vocab]
    if missing:
        problems.append(f"the tokenizer lacks Gemma's newline tokens {missing}")
    return problems + vllm_layout.problems(sys.modules[__name__], folder)
