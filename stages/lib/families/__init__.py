"""Model families: what differs between vision-language families lives in one module per family,
chosen from the checkpoint's config.json `model_type`; no stage branches on a family name.

Each family module (gemma3.py, gemma4.py, qwen3_vl.py) has the same small interface:
    MODEL_TYPE, TITLE, ARCHITECTURE      config.json model_type, a readable name, the class vLLM serves
    STOP_TOKENS                          the tokens that end a chat answer (generation config, parity)
    VISION_TOWER, LANGUAGE_MODEL         module names of the two towers (LoRA's vision/language split)
    ATTENTION_MODULES, MLP_MODULES       Linear leaf names LoRA may wrap in each
    LINEAR_WRAPPED                       suffix of a Linear inside a wrapper module of such a name ("" if none)
    MODULES_TO_SAVE                      trained fully beside LoRA (the projector between the towers)
    IMAGE_SETTINGS                       {image processor setting: what it does}: the resolution params
                                         (params `image:`), the same names in `vllm serve --mm-processor-kwargs`
    VLLM_WEIGHT_PREFIXES, VLLM_MODULES   vLLM 0.33.0's checkpoint-name mapping for the family and the
                                         top-level modules it loads into (read from its source, cited)
    CHAT_TEMPLATE                        the checkpoints' chat template (TRL ships a copy)
    UNSLOTH                              how unsloth loads it (FastVisionModel; GPU only)
    saved_setting(saved, name)           an IMAGE_SETTINGS value as the checkpoint's processor files store it
    image_tokens(config, settings)       the most image tokens one image can take (prompt length bound)
    build_tiny(output_dir, alphabet, seed=0, image_size=, text_hidden_size=, text_layers=,
               vision_hidden_size=, vision_layers=, white_is_zero=)   a tiny untrained model + tokenizer + processor
                                         files, offline (the base stage's `base.family`)
    write_layout(folder), layout_problems(folder)   the key layout vLLM loads: write it / what differs
Adding a family: one module here, its name in FAMILIES, its settings in params.yaml `image:`, its
line in tools/check_vllm_mappings.py, the module in dvc.yaml's deps, and its tests.
"""
import json
from pathlib import Path

from ..cli import UserError
from . import gemma3, gemma4, qwen3_vl

FAMILIES = {module.MODEL_TYPE: module for module in (gemma3, gemma4, qwen3_vl)}


def model_type(model_dir):
    """config.json `model_type` of a model folder (UserError without a readable config.json)."""
    path = Path(model_dir) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: not a readable model config ({e.__class__.__name__})") from None
    return config.get("model_type") if isinstance(config, dict) else None


def family_named(name, where="config.json"):
    if name not in FAMILIES:
        raise UserError(f"{where}: model_type {name!r} is not a supported family "
                        f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[name]


def family_of(model_dir):
    """The family module of a model folder, from its config.json `model_type`."""
    return family_named(model_type(model_dir), where=f"{Path(model_dir) / 'config.json'}")


def processor_settings(model_dir):
    """The image processor's saved settings of a model folder ({} when none): processor_config.json's
    `image_processor` (what transformers 5 writes) or preprocessor_config.json (older checkpoints)."""
    folder = Path(model_dir)
    for name, nested in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        path = folder / name
        if path.is_file():
            doc = json.loads(path.read_text(encoding="utf-8"))
            doc = doc.get(nested, {}) if nested else doc
            if doc:
                return doc
    return {}


def resolution_settings(model_dir):
    """The family's resolution settings as the folder's processor files set them (a real checkpoint's
    values, with no further params): {setting: value}, only the family's IMAGE_SETTINGS."""
    family = family_of(model_dir)
    saved = processor_settings(model_dir)
    return {name: family.saved_setting(saved, name) for name in family.IMAGE_SETTINGS}



def family_image_settings(family, image, where="params.yaml"):
    """The family's own settings of params `image:` ({} when none): params.yaml holds the resolution
    settings of every family side by side, each model takes its family's (IMAGE_SETTINGS) and a null
    keeps the checkpoint's own value. A name that is no family's setting is refused."""
    known = {name for f in FAMILIES.values() for name in f.IMAGE_SETTINGS}
    unknown = sorted(set(image or {}) - known)
    if unknown:
        raise UserError(f"{where}: 'image.{unknown[0]}' is not a resolution setting of any model family "
                        f"(this model, {family.TITLE}: {', '.join(family.IMAGE_SETTINGS)})")
    return {k: v for k, v in (image or {}).items() if k in family.IMAGE_SETTINGS and v is not None}
