"""Gemma 4 (google/gemma-4-*-it, model_type gemma4; transformers Gemma4ForConditionalGeneration).

Image: resized keeping its aspect ratio to a budget of soft tokens (max_soft_tokens, one of
70/140/280/560/1120; patch 16, 3x3 pooling: one soft token per 48x48 px), the same setting name
in vLLM's --mm-processor-kwargs (vllm/model_executor/models/gemma4_mm.py _get_max_soft_tokens).
Key layout: what transformers 5 saves (model.language_model.*, model.vision_tower.*,
model.embed_vision.*), which vLLM 0.33.0 maps itself (hf_to_vllm_mapper below); its vision tower
there is transformers' own Gemma4VisionModel (AutoModel.from_config), so the inner names match.
Gemma4Processor needs torchvision (its video processor): the CPU set installs it (tools/setup.sh).
"""
import sys

from . import tiny, vllm_layout

MODEL_TYPE = "gemma4"
TITLE = "Gemma 4"
ARCHITECTURE = "Gemma4ForConditionalGeneration"
STOP_TOKENS = ("<turn|>",)
VISION_TOWER, LANGUAGE_MODEL = "vision_tower", "language_model"
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_WRAPPED = ".linear"   # vision: q_proj is a Gemma4ClippableLinear around q_proj.linear
# The projector into the language model (embed_vision.embedding_projection, a Linear outside both towers).
MODULES_TO_SAVE = ("embed_vision",)
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
IMAGE_SETTINGS = {"max_soft_tokens": f"soft tokens per image, one of {SOFT_TOKEN_BUDGETS} (aspect ratio kept)"}
# vLLM 0.33.0 vllm/model_executor/models/gemma4_mm.py, Gemma4ForConditionalGeneration.hf_to_vllm_mapper
# (applied in order, every matching prefix: vLLM's WeightsMapper does not stop at the first)
VLLM_WEIGHT_PREFIXES = (
    ("model.vision_tower", "vision_tower"),
    ("model.embed_vision", "embed_vision"),
    ("model.audio_tower.", "audio_tower."),
    ("model.embed_audio.", "embed_audio."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
    ("model", "language_model.model"),
)
VLLM_MODULES = ("language_model.model.", "language_model.lm_head.", "vision_tower.", "embed_vision.")
CHAT_TEMPLATE = "gemma4_v5.jinja"   # google/gemma-4-E2B-it's current template (TRL's copy)
UNSLOTH = "FastVisionModel.from_pretrained (unsloth 2026.10.9 lists gemma4; needs transformers >= 5.x with gemma4)"
SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>",
            "<|video|>", "<|audio>", "<audio|>", "<|audio|>", "<|channel>", "<channel|>", "<|think|>")


def saved_setting(saved, name):
    return saved.get(name)


def image_tokens(config, settings):
    return settings.get("max_soft_tokens") or (config.get("vision_config") or {}).get("default_output_length") or 280


# pixel / 2 into the model, whose 2 * (x - 0.5) then gives white 0, ink -1
WHITE_IS_ZERO = {"do_normalize": True, "image_mean": [0.0] * 3, "image_std": [2.0] * 3}


def build_tiny(output_dir, alphabet, *, seed=0, max_soft_tokens=70, text_hidden_size=64, vision_hidden_size=32,
               text_layers=2, vision_layers=2, image_size=None, white_is_zero=False):
    """An untrained tiny Gemma 4 with the real processor settings (patch 16, pooling 3, the soft-token
    budget), Gemma 4's chat template and special tokens; hidden sizes tiny, no audio tower.
    image_size is not used: Gemma 4 resizes every image to its soft-token budget (70: a 128 px square
    becomes 384 px, 8x8 soft tokens). white_is_zero: the demo base's input scaling (the tiny Gemma 3's
    too): the image processor normalizes so that, after the model's own 2 * (x - 0.5), white paper is
    0 and ink -1 (the real scaling maps white to 1: the tiny model then never learned to read)."""
    import torch
    from transformers import (Gemma4AudioFeatureExtractor, Gemma4Config, Gemma4ForConditionalGeneration,
                              Gemma4ImageProcessor, Gemma4Processor, Gemma4TextConfig, Gemma4VideoProcessor,
                              Gemma4VisionConfig, GenerationConfig)

    tokenizer = tiny.char_tokenizer(
        alphabet, SPECIALS, tiny.chat_template(CHAT_TEMPLATE), bos_token="<bos>", eos_token="<eos>",
        pad_token="<pad>", unk_token="<unk>",
        extra_special_tokens={"boi_token": "<|image>", "eoi_token": "<image|>", "image_token": "<|image|>",
                              "boa_token": "<|audio>", "eoa_token": "<audio|>", "audio_token": "<|audio|>"})
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIALS}
    text = Gemma4TextConfig(
        vocab_size=len(tokenizer), vocab_size_per_layer_input=len(tokenizer), hidden_size=text_hidden_size,
        intermediate_size=4 * text_hidden_size, num_hidden_layers=text_layers, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, global_head_dim=32, hidden_size_per_layer_input=16,
        max_position_embeddings=2048, sliding_window=512,
        layer_types=["sliding_attention"] * (text_layers - 1) + ["full_attention"],
        pad_token_id=ids["<pad>"], eos_token_id=ids["<eos>"], bos_token_id=ids["<bos>"])
    vision = Gemma4VisionConfig(hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
                                num_hidden_layers=vision_layers, num_attention_heads=2, num_key_value_heads=2,
                                head_dim=16,
                                patch_size=16, pooling_kernel_size=3, default_output_length=max_soft_tokens)
    config = Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                          boi_token_id=ids["<|image>"], eoi_token_id=ids["<image|>"], image_token_id=ids["<|image|>"],
                          video_token_id=ids["<|video|>"], audio_token_id=ids["<|audio|>"],
                          boa_token_id=ids["<|audio>"], eoa_token_index=ids["<audio|>"])
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=ids["<bos>"], pad_token_id=ids["<pad>"],
                                               eos_token_id=[ids["<eos>"], ids["<turn|>"]], do_sample=False)
    processor = Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(), tokenizer=tokenizer, video_processor=Gemma4VideoProcessor(),
        image_processor=Gemma4ImageProcessor(max_soft_tokens=max_soft_tokens, patch_size=16, pooling_kernel_size=3,
                                             **(WHITE_IS_ZERO if white_is_zero else {})),
        chat_template=tokenizer.chat_template, image_seq_length=max_soft_tokens)
    model.save_pretrained(str(output_dir))
    processor.save_pretrained(str(output_dir))
    return output_dir


def write_layout(folder):
    """transformers 5 saves Gemma 4 in the checkpoints' layout: nothing to rewrite, only to check."""
    return vllm_layout.check(sys.modules[__name__], folder)


def layout_problems(folder):
    return vllm_layout.problems(sys.modules[__name__], folder)

