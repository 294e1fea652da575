"""The one collator of both backends (stages/lib/training.py OcrCollator) and the image settings
(params `image:`): answer-only labels, pan-and-scan token counts, cut rows counted, and the same
processor inputs in training as in a served request."""
import json

import pytest
import torch
from PIL import Image

from conftest import ROOT
from stages.lib.cli import UserError
from stages.lib.evaluation.client import ChatClient
from stages.lib.modeling import load_processor
from stages.lib.prompt import DEFAULT_INSTRUCTION
from stages.lib.training import OcrCollator

INSTRUCTION = DEFAULT_INSTRUCTION
# small enough that the tiny model's 128 px lines get crops: a 512x128 page is 4 crops of 128x128
PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_crop_size": 32,
                "pan_and_scan_min_ratio_to_activate": 1.2}


@pytest.fixture(scope="module")
def wide_row(tmp_path_factory):
    path = tmp_path_factory.mktemp("wide") / "wide.png"
    image = Image.new("RGB", (512, 128), "white")
    image.paste(Image.new("RGB", (40, 40), "black"), (300, 40))
    image.save(path)
    return {"image_path": str(path), "ocr_text": "一二三"}


def image_tokens(processor, ids):
    return int((ids == processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")).sum())


@pytest.mark.parametrize("image, crops", [({}, 0), (PAN_AND_SCAN, 4)])
def test_image_tokens_are_what_the_settings_say(tiny_base_dir, wide_row, image, crops):
    processor = load_processor(tiny_base_dir, image)
    batch = OcrCollator(processor, INSTRUCTION)([wide_row])
    per_image = processor.image_seq_length
    assert image_tokens(processor, batch["input_ids"][0]) == per_image * (1 + crops)
    assert batch["pixel_values"].shape[0] == 1 + crops     # the whole page, then its crops
    assert batch["token_type_ids"].sum() == per_image * (1 + crops)


def test_labels_are_the_answer_only_and_padding_is_masked(tiny_base_dir, tiny_rows, wide_row):
    processor = load_processor(tiny_base_dir, PAN_AND_SCAN)
    rows = [tiny_rows[0], wide_row]     # different prompt lengths: the first is padded
    batch = OcrCollator(processor, INSTRUCTION)(rows)
    for labels, mask, row in zip(batch["labels"], batch["attention_mask"], rows):
        assert processor.tokenizer.decode(labels[labels != -100]) == row["ocr_text"] + "<end_of_turn>\n"
        assert (labels[mask == 0] == -100).all()
    assert batch["attention_mask"][0].sum() < batch["attention_mask"][1].sum()


def test_a_cut_row_is_counted_and_a_cut_prompt_refused(tiny_base_dir, tiny_rows):
    processor = load_processor(tiny_base_dir)
    whole = OcrCollator(processor, INSTRUCTION)([tiny_rows[0]])["input_ids"].shape[1]
    collator = OcrCollator(processor, INSTRUCTION, max_seq_length=whole - 2)
    batch = collator(tiny_rows[:2])
    assert batch["input_ids"].shape[1] == whole - 2
    assert tiny_rows[0]["image_path"] in collator.cut_rows
    with pytest.raises(UserError, match="max_seq_length' 5 would cut the prompt"):
        OcrCollator(processor, INSTRUCTION, max_seq_length=5)([tiny_rows[0]])


def test_an_unknown_image_setting_is_refused(tiny_base_dir):
    with pytest.raises(UserError, match="'image.max_pixels' is not a resolution setting of any model family"):
        load_processor(tiny_base_dir, {"max_pixels": 100})


def test_settings_are_saved_with_the_model(tiny_base_dir, tmp_path):
    load_processor(tiny_base_dir, PAN_AND_SCAN).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())["image_processor"]
    assert {k: saved[k] for k in PAN_AND_SCAN} == PAN_AND_SCAN


@pytest.mark.parametrize("image", [{}, PAN_AND_SCAN])
def test_training_and_a_served_request_give_identical_processor_inputs(tiny_base_dir, wide_row, tmp_path, image):
    """The request body our client sends, turned into processor inputs by transformers serve's own code
    (its message conversion, then apply_chat_template with the server's --chat-template-kwargs, as
    stages/lib/evaluation/serving.py starts it) on the processor saved with the model."""
    from transformers.cli.serving.utils import BaseHandler, Modality

    from stages.lib.evaluation.serving import image_server_args

    load_processor(tiny_base_dir, image).save_pretrained(tmp_path)   # what merge writes beside the weights
    trained = OcrCollator(load_processor(tiny_base_dir, image), INSTRUCTION).encode(wide_row)
    body = json.loads(ChatClient("http://127.0.0.1:1", "m", INSTRUCTION, max_tokens=8).body(wide_row["image_path"]))
    served_processor = load_processor(tmp_path)     # a server loads the folder as it is, no params
    flags = image_server_args("transformers", image)   # ["--chat-template-kwargs", JSON] or []
    server_kwargs = json.loads(flags[1]) if flags else {}
    messages = BaseHandler.get_processor_inputs_from_messages(body["messages"], Modality.VLM)
    served = served_processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True, return_tensors="pt", **server_kwargs)
    prompt = trained["prompt_length"]
    assert torch.equal(served["input_ids"][0], trained["input_ids"][:prompt])
    assert torch.equal(served["token_type_ids"][0], trained["token_type_ids"][:prompt])
    assert torch.equal(served["pixel_values"], trained["pixel_values"])


def test_servers_get_the_settings_or_the_stage_refuses(monkeypatch):
    from stages.lib.evaluation import serving

    assert serving.image_server_args("vllm", PAN_AND_SCAN)[0] == "--mm-processor-kwargs"
    assert json.loads(serving.image_server_args("transformers", PAN_AND_SCAN)[1]) == PAN_AND_SCAN
    assert serving.image_server_args("transformers", {}) == []
    # an older transformers serve without the option (not installed here): refused, never silently ignored
    monkeypatch.setattr(serving, "transformers_serve_takes", lambda flag: False)
    with pytest.raises(UserError, match="cannot be given to this transformers serve"):
        serving.image_server_args("transformers", PAN_AND_SCAN)


def test_unsloth_is_given_max_seq_length_and_the_same_modules(tiny_base_dir, monkeypatch):
    """unsloth cannot load a vision model without CUDA, so a stand-in records what load_for_training
    passes to FastVisionModel and applies it with peft (tools/gpu_check.sh compares the real thing):
    max_seq_length reaches from_pretrained, and the LoRA targets and modules_to_save give exactly the
    trainable modules of the transformers path."""
    import sys
    import types

    from peft import LoraConfig, get_peft_model

    from stages.lib.families import gemma3
    from stages.lib.modeling import load_model
    from stages.lib.params import load_params
    from stages.lib.training import load_for_training, trainable_modules, training_config

    calls = {}

    class FastVisionModel:
        @staticmethod
        def from_pretrained(path, **kwargs):
            calls["from_pretrained"] = kwargs
            return load_model(path), None

        @staticmethod
        def get_peft_model(model, **kwargs):
            calls["get_peft_model"] = kwargs
            return get_peft_model(model, LoraConfig(
                r=kwargs["r"], lora_alpha=kwargs["lora_alpha"], lora_dropout=kwargs["lora_dropout"],
                target_modules=kwargs["target_modules"], modules_to_save=kwargs["modules_to_save"], bias="none"))

    monkeypatch.setitem(sys.modules, "unsloth", types.SimpleNamespace(FastVisionModel=FastVisionModel))
    config = training_config(load_params(path=ROOT / "params.yaml"), {"max_seq_length": 4096,
                                                                       "finetune_mlp_modules": False})
    unsloth_model, _ = load_for_training(config, tiny_base_dir, "unsloth")
    peft_model, _ = load_for_training(config, tiny_base_dir, "transformers")
    assert calls["from_pretrained"]["max_seq_length"] == 4096
    assert calls["get_peft_model"]["modules_to_save"] == ["multi_modal_projector"]
    assert trainable_modules(unsloth_model, gemma3) == trainable_modules(peft_model, gemma3)
    assert set(trainable_modules(peft_model, gemma3)) == {"lora:language_model", "lora:vision_tower",
                                                          "multi_modal_projector"}
