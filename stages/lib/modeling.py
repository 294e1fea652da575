"""Where the base model lives, loading it, and reading images with it (greedy decoding).

models/base/ holds either the tiny model itself (model_name "tiny": built by the base stage)
or a source.json {"model_name": "/path/to/checkpoint"} pointing at a real local checkpoint.
Nothing here downloads: a model_name that is not a local folder is refused.
"""
import gc
import os
from pathlib import Path

from .cli import UserError
from .io import read_json

BASE_DIR = "models/base"
SOURCE_FILE = "source.json"
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
# The files in which a folder asks transformers to import its own Python (an `auto_map` entry).
CODE_CONFIGS = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json",
                "video_preprocessor_config.json", "adapter_config.json")


def check_no_custom_code(path):
    """A model folder is data: one whose configs name custom code (`auto_map`) is refused with one
    line, before transformers (which would ask "run the custom code? [y/N]") or a server sees it.
    Every load also passes trust_remote_code=False."""
    for name in CODE_CONFIGS:
        file = Path(path) / name
        if file.is_file():
            config = read_json(file)
            if isinstance(config, dict) and "auto_map" in config:
                raise UserError(f"{file}: the folder needs its own Python code (auto_map: "
                                f"{', '.join(map(str, config['auto_map']))[:120]}); this project never runs code "
                                "from a model folder: use a model transformers supports natively")


def check_model_dir(path, what="model_name"):
    """A local folder with config.json and weights (or a PEFT adapter); else a one-line UserError."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"params.yaml: '{what}' {str(path)!r} is not a folder ('tiny' builds a small model; "
                        "a real checkpoint must be downloaded beforehand: nothing is downloaded at run time)")
    if not (path / "config.json").is_file():
        raise UserError(f"params.yaml: '{what}' {str(path)!r} is not a model folder (no config.json)")
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        raise UserError(f"params.yaml: '{what}' {str(path)!r} is not a model folder (no *.safetensors/*.bin weights)")
    check_no_custom_code(path)
    return path


def resolve_base_dir(base_dir=BASE_DIR):
    """The folder to load the base model from: base_dir itself, or where its source.json points."""
    base_dir = Path(base_dir)
    source = base_dir / SOURCE_FILE
    if source.is_file():
        info = read_json(source)
        if not isinstance(info, dict) or not isinstance(info.get("model_name"), str):
            raise UserError(f"{source}: expected {{\"model_name\": \"/path/to/checkpoint\"}}")
        return check_model_dir(info["model_name"])
    if not (base_dir / "config.json").is_file():
        raise UserError(f"{base_dir}: no base model (run `dvc repro base` first)")
    check_no_custom_code(base_dir)
    return base_dir


# params.yaml `image:`: the model family's own image settings (Gemma 3: pan-and-scan and its limits),
# declared once and applied to the processor wherever one is loaded for reading pages.
IMAGE_PARAMS = "image"


def image_settings(params):
    """params.yaml `image:` as processor settings {name: value} ({} when absent or null). Each name
    must be a setting of the model's image processor (checked when a processor is loaded)."""
    value = params.get(IMAGE_PARAMS) if isinstance(params, dict) else None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise UserError(f"params.yaml: '{IMAGE_PARAMS}' must be a mapping of image processor settings, got {value!r}")
    return dict(value)


def apply_image_settings(processor, image, where="params.yaml"):
    """Apply the image settings to a loaded processor; refuses a name its image processor lacks.

    Two places, both needed (transformers 5.24, measured): the processor's own `images_kwargs`
    (Gemma3Processor's class defaults, do_pan_and_scan False, override the image processor's
    attributes on every call), and the image processor's attributes (what save_pretrained writes to
    processor_config.json: the settings recorded with the model). A server is told them separately
    (stages/evaluate.py: `transformers serve --chat-template-kwargs`, `vllm serve --mm-processor-kwargs`)."""
    target = getattr(processor, "image_processor", None)
    for key, value in (image or {}).items():
        if target is None or not hasattr(target, key):
            raise UserError(f"{where}: '{IMAGE_PARAMS}.{key}' is not a setting of this model's image processor "
                            f"({type(target).__name__}): remove it or use the family's own name")
        setattr(target, key, value)
    if image:
        processor.images_kwargs = {**getattr(processor, "images_kwargs", {}), **image}
    return processor


def load_processor(path, image=None):
    """AutoProcessor of a local folder, with the `image` settings (image_settings) applied."""
    from transformers import AutoProcessor

    check_no_custom_code(path)
    try:
        processor = AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
    except ImportError as e:   # Gemma 4 / Qwen3-VL processors hold a video processor built on torchvision
        if "torchvision" not in str(e).lower():
            raise
        raise UserError(f"{path}: this model's processor needs torchvision, which is not installed (its video "
                        "processor): run `make setup`, which installs the matched torch/torchvision pair") from None
    except OSError as e:       # a processor file missing from a copied checkpoint (e.g. the video processor's)
        reason = str(e).split(". ")[0].replace("\n", " ")
        raise UserError(f"{path}: its processor does not load ({reason}): copy every processor file of the "
                        "checkpoint (processor_config.json, preprocessor_config.json, "
                        "video_preprocessor_config.json, tokenizer files) into the folder") from None
    if image and (Path(path) / "config.json").is_file():   # a model folder: its family's settings of `image:`
        from .families import family_image_settings, family_of

        image = family_image_settings(family_of(path), image)
    return apply_image_settings(processor, image)


def load_model(path, *, load_in_4bit=False, dtype=None):
    """AutoModelForImageTextToText from a local folder (4-bit NF4 through bitsandbytes if asked)."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    check_no_custom_code(path)
    kwargs = {"dtype": dtype or torch.float32, "trust_remote_code": False}
    if torch.cuda.is_available():
        # the whole model on this process's GPU: a torchrun worker's LOCAL_RANK (one GPU each), else GPU 0
        kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForImageTextToText.from_pretrained(str(path), **kwargs)


# How many tokens an answer may take: the longest tokenized label times this, plus this many (the
# end-of-turn token, and room for a model that writes a little more than the label).
BUDGET_FACTOR, BUDGET_EXTRA = 1.25, 16


def context_length(model_dir):
    """The model's context in tokens (text_config.max_position_embeddings), or None if not stated."""
    config = read_json(Path(model_dir) / "config.json")
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    value = text.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


def prompt_length(model_dir, tokenizer, instruction, image=None):
    """Tokens before the answer: the image's soft tokens (the most the family's resolution settings
    allow: the folder's, params `image:` over them; stages/lib/families/) plus the templated
    instruction (an upper bound)."""
    from .families import FAMILIES, family_image_settings, resolution_settings

    config = read_json(Path(model_dir) / "config.json")
    family = FAMILIES.get(config.get("model_type"))
    if family is None:   # a model of no known family (evaluated as it is): Gemma 3's count, 256 when unstated
        image_tokens = config.get("mm_tokens_per_image") or 256
    else:
        settings = {**resolution_settings(model_dir), **family_image_settings(family, image)}
        image_tokens = family.image_tokens(config, settings)
    return image_tokens + len(tokenizer(instruction, add_special_tokens=False)["input_ids"]) + 16


def generation_budget(tokenizer, labels, model_dir, instruction):
    """max_new_tokens for greedy reading: enough for the longest label of the data (with a margin),
    never past the model's context. The one rule for evaluation (evaluate.max_tokens 'auto') and
    the validation CER inside training. Returns (budget, details)."""
    lengths = [len(ids) for ids in tokenizer(list(labels), add_special_tokens=False)["input_ids"]] or [0]
    budget = int(max(lengths) * BUDGET_FACTOR) + BUDGET_EXTRA
    context = context_length(model_dir)
    room = context - prompt_length(model_dir, tokenizer, instruction) if context else None
    if room is not None:
        budget = max(1, min(budget, room))
    return budget, {"longest_label_tokens": max(lengths), "context": context, "room": room}


def read_images(model, processor, images, instruction, *, batch_size=16, max_new_tokens=64, progress=False,
                stats=None):
    """Greedy transcription of PIL images with the shared prompt; returns a list of strings.
    `stats` (a dict), when given, gets "truncated": answers that reached max_new_tokens without an
    end-of-turn (cut, not finished)."""
    import torch
    from tqdm import tqdm

    from .prompt import generation_prompt

    text = generation_prompt(processor, instruction)
    was_training = model.training
    model.eval()
    out = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc="reading", disable=not progress, leave=False):
        batch = [[image] for image in images[start:start + batch_size]]
        inputs = processor(text=[text] * len(batch), images=batch, return_tensors="pt",
                           padding=True, padding_side="left", add_special_tokens=False).to(model.device)
        with torch.no_grad():
            ids = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens)
        new = ids[:, inputs["input_ids"].shape[1]:]
        out.extend(s.strip() for s in processor.batch_decode(new, skip_special_tokens=True))
        if stats is not None:
            eos = model.generation_config.eos_token_id
            eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
            # a finished answer holds an end token (generation stops there); a cut one does not
            stats["truncated"] = stats.get("truncated", 0) + sum(not eos & set(row) for row in new.tolist())
    model.train(was_training)
    return out


def free_memory():
    """Collect garbage and hand cached CUDA memory back (between trials, between merge steps)."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
