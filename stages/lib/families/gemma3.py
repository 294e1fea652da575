"""Gemma 3 (google/gemma-3-*-it, model_type gemma3): the default family.

Image: fixed square resize (896 px on real checkpoints, 256 soft tokens), optional pan-and-scan
crops for pages (the four settings below; vLLM takes the same names in --mm-processor-kwargs:
vllm/model_executor/models/gemma3_mm.py reads them from images_kwargs). Key layout: the real
checkpoints' (stages/lib/gemma3_layout.py), which vLLM 0.33.0's gemma3_mm.py maps with
hf_to_vllm_mapper below. The tiny model: stages/lib/tinymodel.py.
"""
from .. import gemma3_layout

MODEL_TYPE = "gemma3"
TITLE = "Gemma 3"
ARCHITECTURE = "Gemma3ForConditionalGeneration"
STOP_TOKENS = ("<end_of_turn>",)
VISION_TOWER, LANGUAGE_MODEL = "vision_tower", "language_model"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "out_proj")   # SigLIP: out_proj
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "fc1", "fc2")         # SigLIP: fc1, fc2
# A bare parameter (mm_input_projection_weight): LoRA cannot reach it, so it trains fully.
LINEAR_WRAPPED = ""
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


def build_tiny(output_dir, alphabet, *, seed=0, **sizes):
    from ..tinymodel import build_tiny_model

    return build_tiny_model(output_dir, alphabet, seed=seed, **sizes)


def write_layout(folder):
    return gemma3_layout.write_real_layout(folder)


def layout_problems(folder):
    return gemma3_layout.layout_problems(folder)
