"""The tiny Gemma 3: builds offline, reloads with the Auto classes, and is wired for OCR."""
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from stages.lib.prompt import DEFAULT_INSTRUCTION, generation_prompt
from stages.lib.synthetic import charset
from stages.lib.tinymodel import build_tiny_model


def _inputs(processor, images):
    text = generation_prompt(processor, DEFAULT_INSTRUCTION)
    return processor(text=[text] * len(images), images=[[im] for im in images], return_tensors="pt",
                     add_special_tokens=False)


def test_builds_and_reloads(tiny_base_dir):
    model = AutoModelForImageTextToText.from_pretrained(tiny_base_dir)
    processor = AutoProcessor.from_pretrained(tiny_base_dir)
    tok = processor.tokenizer
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert sum(p.numel() for p in model.parameters()) < 3_000_000
    # Gemma's special tokens, the image token the config expects, one image token per 32 px cell
    assert model.config.image_token_index == tok.convert_tokens_to_ids("<image_soft_token>")
    assert model.config.mm_tokens_per_image == processor.image_seq_length == 16
    assert tok.convert_tokens_to_ids("<end_of_turn>") in model.generation_config.eos_token_id
    # character level: one token per character; unseen characters fall back to bytes
    line = "台北市信義路5段7號"
    assert tok.tokenize(line) == list(line)
    assert tok.tokenize("€") == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert tok.decode(tok("x€台")["input_ids"]) == "x€台"
    # the Gemma 3 chat template: image before the instruction, model turn opened
    inputs = _inputs(processor, [Image.new("RGB", (128, 128), "white")])
    ids = inputs["input_ids"][0].tolist()
    assert ids.count(model.config.image_token_index) == 16
    assert tok.decode(ids).endswith("請給我 OCR 結果<end_of_turn>\n<start_of_turn>model\n")
    # white background normalises to 0 (image_mean = image_std = 1)
    assert inputs["pixel_values"].abs().max() == 0


def test_projector_passes_images_through(tiny_base_dir):
    """Random init leaves the projector at zero (every image looks the same); ours is re-initialised."""
    model = AutoModelForImageTextToText.from_pretrained(tiny_base_dir).eval()
    processor = AutoProcessor.from_pretrained(tiny_base_dir)
    assert model.model.multi_modal_projector.mm_input_projection_weight.abs().sum() > 0
    black = Image.new("RGB", (128, 128), "white")
    black.paste((0, 0, 0), (0, 0, 32, 32))
    with torch.no_grad():
        logits = model(**_inputs(processor, [Image.new("RGB", (128, 128), "white"), black])).logits[:, -1]
    assert not torch.allclose(logits[0], logits[1])


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", charset(), seed=3, text_hidden_size=64, vision_hidden_size=64)
    b = build_tiny_model(tmp_path / "b", charset(), seed=3, text_hidden_size=64, vision_hidden_size=64)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()
