"""A tiny, untrained Gemma 3 vision-language model built offline (no hub), saved as an
ordinary model folder that AutoModelForImageTextToText / AutoProcessor load.

What makes it able to learn OCR on 2 CPU cores (see the field notes):
- a character-level tokenizer (one token per character of `alphabet`, no merges, byte
  fallback for anything else) with Gemma's special tokens;
- image normalisation mean=1, std=1: the white background maps to 0;
- patch 32 on a 128 px image and mm_tokens_per_image=16: one image token per 32x32 cell,
  which is one character of stages/lib/synthetic.py's 4x4 grid (no pooling);
- the multi-modal projector re-initialised (it is all zeros after random init, so every
  image would embed to 0 and the vision tower would get no gradient).
It mirrors real Gemma 3 checkpoints where servers look (stages/lib/families/gemma3.py): no SigLIP
pooling head, the real key layout on disk, and Gemma's "\n\n" / "\n\n\n" / "\n\n\n\n" tokens
(BPE merges of "\n", as in Gemma's tokenizer).
"""
import json
import math
from pathlib import Path

from .families import family_of, tiny
from .families.gemma3 import write_real_layout

# Gemma's special tokens, in Gemma's order for the first ids (pad 0, eos 1, bos 2, unk 3).
PAD, EOS, BOS, UNK = "<pad>", "<eos>", "<bos>", "<unk>"
START_TURN, END_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, EOI, IMAGE = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
SPECIALS = [PAD, EOS, BOS, UNK, START_TURN, END_TURN, BOI, EOI, IMAGE]
NEWLINE_MERGES = (("\n", "\n"), ("\n\n", "\n"), ("\n\n", "\n\n"))   # Gemma's newline runs


def chat_template():
    """TRL's copy of the Gemma 3 chat template (the one real checkpoints ship)."""
    return tiny.chat_template("gemma3.jinja")


def build_tokenizer(alphabet):
    """A Gemma-style fast tokenizer with one token per character and byte fallback."""
    return tiny.char_tokenizer(
        alphabet, SPECIALS, chat_template(), merges=NEWLINE_MERGES, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        unk_token=UNK, additional_special_tokens=[START_TURN, END_TURN],
        extra_special_tokens={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE},
        add_bos_token=False, add_eos_token=False)


# Real Gemma 3 checkpoints (4b/12b/27b): 896 px, 14 px patches (64x64), pooled 4x4 into 256 image
# tokens, mean/std 0.5, a long context. real_shape=True builds that shape with tiny hidden sizes: the
# processor, token counts, pan-and-scan crops and pixel tensors are those of a real checkpoint.
REAL_SHAPE = {"image_size": 896, "patch": 14, "tokens_per_image": 256, "norm": 0.5, "context": 8192}


def build_tiny_model(output_dir, alphabet, *, seed=0, image_size=128, text_hidden_size=128,
                     text_layers=2, vision_hidden_size=128, vision_layers=2, real_shape=False, norm=None):
    """Save an untrained tiny Gemma3ForConditionalGeneration + processor to output_dir.
    real_shape: Gemma 3's real image geometry (REAL_SHAPE; image_size is then ignored).
    norm: the image mean and std (default: 1, white paper in as 0; real_shape: Gemma 3's 0.5)."""
    import torch
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil,
                              Gemma3Processor, Gemma3TextConfig, GenerationConfig, SiglipVisionConfig)

    patch, tokens_per_image, norm_default, context = 32, 16, 1.0, 1024
    if real_shape:
        image_size, patch, tokens_per_image, norm_default, context = (REAL_SHAPE[k] for k in (
            "image_size", "patch", "tokens_per_image", "norm", "context"))
    norm = norm if norm is not None else norm_default
    if image_size % patch or (image_size // patch) ** 2 % tokens_per_image:
        raise ValueError(f"image_size must be a multiple of {patch} giving a multiple of 4 patches per side")
    tokenizer = build_tokenizer(alphabet)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIALS}
    heads = max(1, text_hidden_size // 32)
    text_config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden_size, intermediate_size=4 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
        head_dim=32, query_pre_attn_scalar=32, max_position_embeddings=context, sliding_window=512,
        pad_token_id=ids[PAD], eos_token_id=ids[EOS], bos_token_id=ids[BOS],
    )
    vision_config = SiglipVisionConfig(
        hidden_size=vision_hidden_size, intermediate_size=4 * vision_hidden_size,
        num_hidden_layers=vision_layers, num_attention_heads=max(1, vision_hidden_size // 32),
        image_size=image_size, patch_size=patch, vision_use_head=False,   # Gemma 3 has no pooling head
    )
    config = Gemma3Config(
        text_config=text_config, vision_config=vision_config, mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids[BOI], eoi_token_index=ids[EOI], image_token_index=ids[IMAGE],
    )
    config.pad_token_id, config.eos_token_id, config.bos_token_id = ids[PAD], ids[EOS], ids[BOS]

    torch.manual_seed(seed)
    model = Gemma3ForConditionalGeneration(config)
    projector = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():  # zero by default: re-initialise so images reach the language model
        projector.normal_(0.0, 1.0 / math.sqrt(vision_hidden_size))
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], pad_token_id=ids[PAD], eos_token_id=[ids[EOS], ids[END_TURN]],
        do_sample=False, max_new_tokens=64,
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=[norm] * 3,
        image_std=[norm] * 3, do_pan_and_scan=False, do_convert_rgb=True,
    )
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                chat_template=chat_template(), image_seq_length=tokens_per_image)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    write_real_layout(output_dir)   # what transformers saves from a config is not the real layout
    processor.save_pretrained(output_dir)
    (output_dir / "tiny_model.json").write_text(json.dumps({
        "seed": seed, "image_size": image_size, "text_hidden_size": text_hidden_size, "text_layers": text_layers,
        "vision_hidden_size": vision_hidden_size, "vision_layers": vision_layers, "real_shape": real_shape,
        "vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters()),
    }, indent=2) + "\n", encoding="utf-8")
    return output_dir


def pretrain(model_dir, samples, instruction, *, steps, learning_rate, batch_size, seed, warmup_steps=50):
    """Full (no LoRA) pre-training of the tiny model (any family) in model_dir on (PIL image, text) samples,
    in place: AdamW, linear warm-up then cosine, clip 1.0; loss on the answer only (TRL's
    collator on in-memory images; fine-tuning uses training.OcrCollator: the same prompt and masking). Returns {"pretrain_loss": mean of the last 50 steps, ...}."""
    import random
    import time

    import torch
    from tqdm import tqdm
    from transformers import AutoModelForImageTextToText, AutoProcessor, get_cosine_schedule_with_warmup
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    from .prompt import training_example

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), trust_remote_code=False)
    processor = AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=False)
    collator = DataCollatorForVisionLanguageModeling(processor, completion_only_loss=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, min(warmup_steps, steps // 10), steps)
    model.train()
    losses, start = [], time.time()
    bar = tqdm(range(steps), desc="pre-training the tiny base", unit="step")
    for _ in bar:
        batch = collator([training_example(image, text, instruction) for image, text in rng.sample(samples, batch_size)])
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.save_pretrained(str(model_dir))
    family_of(model_dir).write_layout(model_dir)   # the real checkpoints' key layout (Gemma 3: rewritten)
    tail = losses[-50:]
    return {"pretrain_loss": sum(tail) / len(tail), "pretrain_first_loss": losses[0],
            "pretrain_runtime_s": round(time.time() - start, 2), "pretrain_steps": steps}
