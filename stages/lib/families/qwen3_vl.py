"""Qwen3-VL (Qwen/Qwen3-VL-*-Instruct, model_type qwen3_vl; transformers Qwen3VLForConditionalGeneration).
Chosen over Qwen3.5: both load in transformers 5.24 and vLLM 0.33.0, but Qwen3.5's language model
is a hybrid with linear-attention layers, and Qwen3-VL is the base most OCR fine-tunes start from.

Image: dynamic resolution, resized (aspect ratio kept, sides multiples of 32 px: patch 16, 2x2
merge) so its pixel count lies between min_pixels and max_pixels; one token per 32x32 px. The
image processor (transformers 5) keeps them as size = {shortest_edge, longest_edge}, the setting
declared here; vLLM takes the same `size` (or min_pixels / max_pixels) in --mm-processor-kwargs
(vllm/model_executor/models/qwen2_vl.py _get_vision_size). Key layout: what transformers saves (model.visual.*, model.language_model.*,
lm_head.* when untied), which vLLM 0.33.0 maps itself (hf_to_vllm_mapper below; its vision
transformer uses transformers' names: patch_embed.proj, pos_embed, blocks.N.attn.qkv,
mlp.linear_fc1/2, merger, deepstack_merger_list).
Qwen3VLProcessor needs torchvision (its video processor): the CPU set installs it (tools/setup.sh).
"""
import sys

from . import tiny, vllm_layout

MODEL_TYPE = "qwen3_vl"
TITLE = "Qwen3-VL"
ARCHITECTURE = "Qwen3VLForConditionalGeneration"
STOP_TOKENS = ("<|im_end|>",)
VISION_TOWER, LANGUAGE_MODEL = "visual", "language_model"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "proj")     # vision: attn.qkv, attn.proj
MLP_MODULES = ("gate_proj", "up_proj", "down_proj", "linear_fc1", "linear_fc2")  # vision and mergers: linear_fc*
LINEAR_WRAPPED = ""
# The merger (the projector into the language model) sits inside `visual`: trained fully beside LoRA.
# The deepstack mergers (a ModuleList, which peft's modules_to_save refuses) get LoRA like the tower.
MODULES_TO_SAVE = ("visual.merger",)
IMAGE_SETTINGS = {
    "size": "{shortest_edge: fewest pixels, longest_edge: most pixels} an image is resized to (min_pixels / "
            "max_pixels); one token per 32x32 px",
}
# vLLM 0.33.0 vllm/model_executor/models/qwen3_vl.py, Qwen3VLForConditionalGeneration.hf_to_vllm_mapper
VLLM_WEIGHT_PREFIXES = (
    ("model.visual.", "visual."),
    ("lm_head.", "language_model.lm_head."),
    ("model.language_model.", "language_model.model."),
)
VLLM_MODULES = ("visual.", "language_model.model.", "language_model.lm_head.")
CHAT_TEMPLATE = "qwen3_vl.jinja"
UNSLOTH = "FastVisionModel.from_pretrained (unsloth 2026.10.9 lists qwen3_vl)"
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>")
PIXELS_PER_TOKEN = 32 * 32


def saved_setting(saved, name):
    """size, also from older checkpoints' top-level min_pixels / max_pixels."""
    size = dict(saved.get("size") or {})
    for key, edge in (("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge")):
        if saved.get(key):
            size[edge] = saved[key]
    return size or None


def image_tokens(config, settings):
    return ((settings.get("size") or {}).get("longest_edge") or 16777216) // PIXELS_PER_TOKEN


def build_tiny(output_dir, alphabet, *, seed=0, image_size=128, text_hidden_size=64, vision_hidden_size=32,
               text_layers=2, vision_layers=2, white_is_zero=False):
    """An untrained tiny Qwen3-VL with the real processor settings (patch 16, 2x2 merge, temporal
    patch 2, mean/std 0.5), Qwen3-VL's chat template and special tokens; the pixel range from
    image_size: min_pixels image_size^2 (a 128 px square stays 128 px, one token per 32 px cell),
    max_pixels (2 x image_size)^2. white_is_zero: the demo base's input scaling (the tiny Gemma 3's
    too), mean/std 1: white paper is 0, ink -1. Measured, 400 pre-training steps on 2 cores: held-out
    CER 0.51 with it, 1.04 with the real 0.5 (white 1: the tiny model learned the text, not to read)."""
    min_pixels, max_pixels = image_size * image_size, 4 * image_size * image_size
    norm = 1.0 if white_is_zero else 0.5
    import torch
    from transformers import (GenerationConfig, Qwen2VLImageProcessor, Qwen3VLConfig, Qwen3VLForConditionalGeneration,
                              Qwen3VLProcessor, Qwen3VLVideoProcessor)

    tokenizer = tiny.char_tokenizer(
        alphabet, SPECIALS, tiny.chat_template(CHAT_TEMPLATE), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                              "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"})
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIALS}
    config = Qwen3VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": text_hidden_size,
                     "intermediate_size": 4 * text_hidden_size, "num_hidden_layers": text_layers, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "head_dim": 32, "max_position_embeddings": 2048,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [8, 4, 4],
                                         "mrope_interleaved": True},
                     "pad_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"]},
        vision_config={"depth": vision_layers, "hidden_size": vision_hidden_size, "intermediate_size": 4 * vision_hidden_size,
                       "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
                       "out_hidden_size": text_hidden_size, "num_position_embeddings": 256,
                       "deepstack_visual_indexes": list(range(min(vision_layers, 3)))},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(pad_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"]],
                                               do_sample=False)
    image_processor = Qwen2VLImageProcessor(patch_size=16, merge_size=2, temporal_patch_size=2,
                                            min_pixels=min_pixels, max_pixels=max_pixels,
                                            image_mean=[norm] * 3, image_std=[norm] * 3)
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                                 chat_template=tokenizer.chat_template)
    model.save_pretrained(str(output_dir))
    processor.save_pretrained(str(output_dir))
    return output_dir


def write_layout(folder):
    return vllm_layout.check(sys.modules[__name__], folder)


def layout_problems(folder):
    return vllm_layout.problems(sys.modules[__name__], folder)
