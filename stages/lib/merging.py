"""The mechanics of the merge stage: pre-flight checks, the two merge paths, the finished folder,
and the parity check (greedy decoding with the logits of every step).

Memory: the peft path holds one 16-bit copy of the model. The base is memory-mapped from its
safetensors; merge_and_unload() adds B @ A into each weight in place (the mapped pages become
private ones: no second copy), and the merged folder is reloaded for the parity check only
after the first copy is freed. Measured by bench/bench_merge.py on a 555 MiB bf16 Gemma 3:
peak 1.26x the model above the ~0.4 GB the imports take (1.39x without return_freed_memory();
the rest is the adapter in float32, the largest layer's delta, activations). A float32 base
(the tiny one) is converted on load, briefly holding the float32 pages too: real checkpoints
ship in bf16.
"""
import json
import math
import shutil
import struct
from contextlib import contextmanager
from pathlib import Path

from .cli import UserError
from .io import read_json
from .modeling import free_memory

DTYPES = ("auto", "bfloat16", "float16", "float32")
# Parity tolerance: max |merged - reference| over every logit of every step, divided by the
# largest |reference logit|. Merging rounds W + BA once to the storage dtype, while the
# reference adds the LoRA branch in float32 at run time: the gap is a few ulps of the dtype
# (measured on the tiny model: bf16 1.7e-2, fp16 3e-3, fp32 7e-7), far below what a LoRA
# left unmerged changes (the adapter's own effect was ~1.0-1.6 on the same scale).
TOLERANCE = {"bfloat16": 5e-2, "float16": 1e-2, "float32": 1e-4}


def return_freed_memory():
    """Let freed large blocks go back to the OS at once (Linux/glibc; a no-op elsewhere).

    glibc raises its mmap threshold as large blocks are freed, then keeps later ones in its
    heap: the merge's per-layer float32 deltas piled up as ~0.13x the model of resident memory
    in the bench. A fixed 1 MiB threshold (M_MMAP_THRESHOLD) gives each back when freed."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)
    except (OSError, AttributeError):
        pass


# Model types vLLM refuses to serve in float16 (Gemma 3: activations overflow float16; vLLM 0.33.0's
# Gemma 3 config rejects it). Their merges are bf16, else float32.
NO_FLOAT16 = ("gemma3",)


def pick_dtype(name, model_type="gemma3"):
    """'auto' -> bf16 where the device supports it (CPUs: yes), else float16 only for a family vLLM
    serves in float16 and float32 for the others (Gemma 3). Never 4-bit: merging needs real weights."""
    import torch

    no_fp16 = model_type in NO_FLOAT16
    if name == "float16" and no_fp16:
        raise UserError(f"--dtype float16: vLLM does not serve {model_type} in float16 (use bfloat16 or float32)")
    if name == "auto":
        bf16 = not torch.cuda.is_available() or torch.cuda.is_bf16_supported()
        name = "bfloat16" if bf16 else ("float32" if no_fp16 else "float16")
    return name, getattr(torch, name)


def make_readable(folder):
    """Mode 0644 for every file of a model folder: a server running as another user must read them
    (temp files and safetensors shards written through mkstemp are 0600)."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            path.chmod(0o644)


# ---------------------------------------------------------------- pre-flight checks (no torch)

def safetensors_header(path):
    """{tensor name: (dtype, shape)} from a .safetensors header, without reading the weights."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_base(base_dir):
    """The base must be an ordinary 16/32-bit checkpoint: a pre-quantized (4-bit) one cannot be merged into."""
    config = json.loads((Path(base_dir) / "config.json").read_text(encoding="utf-8"))
    quant = config.get("quantization_config")
    if quant:
        raise UserError(f"{base_dir}: the base is a quantized checkpoint ({quant.get('quant_method', '?')}); merging "
                        "into 4-bit weights loses the adapter's precision: point model_name at the 16-bit original")
    if not next(Path(base_dir).glob("*.safetensors"), None):
        raise UserError(f"{base_dir}: no *.safetensors weights (convert the checkpoint to safetensors first)")
    return config


def merged_size_bytes(base_dir, element_bytes):
    """The merged weights' size: every tensor of the base at `element_bytes` per element."""
    total = 0
    for path in Path(base_dir).glob("*.safetensors"):
        for _, shape in safetensors_header(path).values():
            total += math.prod(shape) * element_bytes
    return total


def check_free_space(out_dir, needed, keep_free_gb):
    """Refuse before any work when the output's filesystem lacks room for the merged model."""
    probe = Path(out_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    want = int(needed * 1.05) + int(keep_free_gb * 2**30)  # 5% for processor files and headers
    if free < want:
        raise UserError(f"{out_dir}: not enough disk space on {probe} ({free / 2**30:.2f} GiB free, the merged model "
                        f"needs {needed / 2**30:.2f} GiB + 5% + {keep_free_gb:g} GiB kept free): free some space "
                        "or lower --keep-free-gb")
    return free


def read_adapter(adapter_dir):
    """adapter_config.json of a peft LoRA adapter, checked."""
    adapter_dir = Path(adapter_dir)
    config_path, weights = adapter_dir / "adapter_config.json", adapter_dir / "adapter_model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise UserError(f"{adapter_dir}: no LoRA adapter (adapter_config.json + adapter_model.safetensors; "
                        "run `dvc repro train` first)")
    config = read_json(config_path)
    if config.get("peft_type") != "LORA":
        raise UserError(f"{config_path}: peft_type is {config.get('peft_type')!r}, only LORA adapters can be merged")
    return config


def note_trained_base(adapter_config, base_dir):
    """Say so when the adapter names another base folder. Only a note: the same checkpoint can
    sit at another path (trained elsewhere); check_adapter_fits refuses what cannot fit."""
    named = adapter_config.get("base_model_name_or_path")
    if named and Path(named).exists() and Path(named).resolve() != Path(base_dir).resolve():
        print(f"note: the adapter was trained on {named}; merging it into {base_dir}")


def check_adapter_fits(model, adapter_dir):
    """Every adapter tensor must land on a module of this base with matching shapes.

    peft itself only warns about adapter keys that match nothing, so an adapter trained on
    another base could load half-applied; this refuses it instead."""
    import torch

    params, modules = dict(model.named_parameters()), dict(model.named_modules())
    wrong = []
    tensors = safetensors_header(Path(adapter_dir) / "adapter_model.safetensors")
    for key, (_, shape) in sorted(tensors.items()):
        name = key.removeprefix("base_model.model.")
        for part in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(part):
                module = modules.get(name[: -len(part)])
                if not isinstance(module, torch.nn.Linear):
                    wrong.append(f"{name[: -len(part)]} is not a Linear layer of the base")
                elif part == ".lora_A.weight" and shape[1] != module.in_features:
                    wrong.append(f"{name} has {shape[1]} inputs, the base layer {module.in_features}")
                elif part == ".lora_B.weight" and shape[0] != module.out_features:
                    wrong.append(f"{name} has {shape[0]} outputs, the base layer {module.out_features}")
                break
        else:  # a fully trained module (modules_to_save): same parameter, same shape
            if name not in params:
                wrong.append(f"{name} is not a parameter of the base")
            elif list(params[name].shape) != list(shape):
                wrong.append(f"{name} is {list(shape)}, the base's {list(params[name].shape)}")
        if wrong:
            break
    if wrong:
        raise UserError(f"{adapter_dir}: the adapter does not fit this base ({wrong[0]}): was it trained on "
                        "another model? Re-run `dvc repro train` on this base")
    return len(tensors)


# ---------------------------------------------------------------- parity

def stop_token_ids(tokenizer, stop_tokens):
    """The tokenizer's eos and the family's end-of-answer tokens (Gemma 3: <end_of_turn>) that it has."""
    ids = [tokenizer.eos_token_id] + [tokenizer.convert_tokens_to_ids(t) for t in stop_tokens]
    return list(dict.fromkeys(t for t in ids if isinstance(t, int) and t != tokenizer.unk_token_id))


def greedy_with_logits(model, processor, images, instruction, max_new_tokens, stop_tokens):
    """Per image: (generated token ids, float32 logits of every step [steps, vocab]) on the CPU."""
    import torch

    from .prompt import generation_prompt

    text = generation_prompt(processor, instruction)
    # The same stop tokens for every model compared (a chat answer ends with the family's end-of-turn):
    # a base whose generation_config stops at <eos> only must not "differ" from its merge, which stops at both.
    stop = stop_token_ids(processor.tokenizer, stop_tokens)
    model.eval()
    runs = []
    for image in images:
        inputs = processor(text=[text], images=[[image]], return_tensors="pt", add_special_tokens=False)
        inputs = inputs.to(model.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.no_grad():
            out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=stop,
                                 output_logits=True, return_dict_in_generate=True)
        tokens = out.sequences[0, inputs["input_ids"].shape[1]:].tolist()
        runs.append((tokens, torch.stack(out.logits)[:, 0].float().cpu()))
    return runs


def max_relative_gap(reference, other):
    """max |other - reference| / max |reference| over the steps both runs share (equal prefixes)."""
    gap = scale = 0.0
    for (ref_tokens, ref_logits), (tokens, logits) in zip(reference, other):
        same = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b),
                    min(len(ref_tokens), len(tokens)))
        steps = min(same + 1, len(ref_logits), len(logits))  # up to and including the first divergence
        gap = max(gap, (ref_logits[:steps] - logits[:steps]).abs().max().item())
        scale = max(scale, ref_logits.abs().max().item())
    return gap / max(scale, 1e-12)


def is_near_tie(ref, run, tolerance):
    """Two greedy runs that part where the reference's logits for both tokens are within the
    tolerance of each other (relative to its largest logit): a rounding flip of a near tie, as the
    merge dtype's few ulps can cause on any model, not a wrong merge (which moves the logits far
    more; the logit gap up to that step still has to be within the tolerance)."""
    (ref_tokens, ref_logits), (tokens, _) = ref, run
    step = next((i for i, (a, b) in enumerate(zip(ref_tokens, tokens)) if a != b), None)
    if step is None:
        return False   # one stopped earlier: an <end_of_turn> against a token is no tie
    scale = max(ref_logits.abs().max().item(), 1e-12)
    margin = (ref_logits[step, ref_tokens[step]] - ref_logits[step, tokens[step]]).item() / scale
    return margin <= tolerance


def judge(reference, runs, tolerance):
    """The parity verdict: (passed, greedy mismatches, near ties, relative logit gap)."""
    differ = [(ref, run) for ref, run in zip(reference, runs) if ref[0] != run[0]]
    near_ties = sum(is_near_tie(ref, run, tolerance) for ref, run in differ)
    mismatches = len(differ) - near_ties
    gap = max_relative_gap(reference, runs)
    return mismatches == 0 and gap <= tolerance, mismatches, near_ties, gap


@contextmanager
def vision_lora_off(peft_model, vision_tower):
    """Context: the vision tower's LoRA layers disabled (to measure what the parity check would see)."""
    from peft.tuners.lora import LoraLayer

    layers = [m for n, m in peft_model.named_modules() if f".{vision_tower}." in n and isinstance(m, LoraLayer)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            layer.enable_adapters(True)


# ---------------------------------------------------------------- merging

def load_base(base_dir, torch_dtype, strict=False):
    """The model in base_dir; strict: a UserError unless every saved tensor has a place in the
    model and every parameter was saved (how the merged folder is reloaded)."""
    import torch
    from transformers import AutoModelForImageTextToText

    extra = {"device_map": "cuda"} if torch.cuda.is_available() else {}
    model, info = AutoModelForImageTextToText.from_pretrained(str(base_dir), dtype=torch_dtype,
                                                              output_loading_info=True, trust_remote_code=False,
                                                              **extra)
    wrong = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if strict and wrong:
        raise UserError(f"{base_dir}: reloading it gave {', '.join(f'{len(v)} {k}' for k, v in wrong.items())} "
                        f"(first: {next(iter(next(iter(wrong.values()))))})")
    return model


def reference_runs(base_dir, adapter_dir, torch_dtype, processor, images, instruction, max_new_tokens):
    """Base + adapter (unmerged) in the merge dtype: the runs the merged model must reproduce.

    Also the base alone and the base with the vision LoRA off, whose gaps show how large a
    difference a missing adapter (or an unmerged vision tower) makes on the same scale.
    Returns (peft model, reference runs, figures)."""
    from peft import PeftModel

    from .families import family_of

    family = family_of(base_dir)
    model = load_base(base_dir, torch_dtype)
    n_tensors = check_adapter_fits(model, adapter_dir)
    peft_model = PeftModel.from_pretrained(model, str(adapter_dir))
    args = (processor, images, instruction, max_new_tokens, family.STOP_TOKENS)
    reference = greedy_with_logits(peft_model, *args)
    with peft_model.disable_adapter():
        base_runs = greedy_with_logits(peft_model, *args)
    with vision_lora_off(peft_model, family.VISION_TOWER) as n_vision:
        no_vision = greedy_with_logits(peft_model, *args) if n_vision else None
    figures = {
        "adapter_tensors": n_tensors,
        "vision_lora_layers": n_vision,
        "adapter_effect": max_relative_gap(reference, base_runs),
        "vision_lora_effect": max_relative_gap(reference, no_vision) if no_vision else 0.0,
    }
    return peft_model, reference, figures


def merge_with_peft(peft_model, out_dir):
    """peft's merge: each LoRA layer's W += scale * B @ A in place, then save as safetensors."""
    merged = peft_model.merge_and_unload()
    merged.save_pretrained(str(out_dir))


def merge_with_unsloth(base_dir, adapter_dir, out_dir, torch_dtype, processor):
    """The GPU path: unsloth's own 16-bit merged save (ran on an H200 with unsloth 2026.10.9; not on CPUs).

    unsloth loads the base named in adapter_config.json, so a copy of the adapter config that
    names `base_dir` is used: the merge cannot silently pick another base."""
    import tempfile

    from unsloth import FastVisionModel

    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text(encoding="utf-8"))
        config["base_model_name_or_path"] = str(Path(base_dir).resolve())
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")
        (Path(tmp) / "adapter_model.safetensors").symlink_to(Path(adapter_dir, "adapter_model.safetensors").resolve())
        model, _ = FastVisionModel.from_pretrained(tmp, load_in_4bit=False, dtype=torch_dtype,
                                                  trust_remote_code=False)
        model.save_pretrained_merged(str(out_dir), processor, save_method="merged_16bit")
        del model
    free_memory()


SAFETENSORS_DTYPE = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def stored_dtypes(folder):
    """The set of safetensors dtypes ('BF16', 'F32', ...) of every tensor in a model folder."""
    return {d for p in Path(folder).glob("*.safetensors") for d, _ in safetensors_header(p).values()}


def merge_backend(backend, base_dir, dtype_name):
    """unsloth's merged save merges the base's files shard by shard in their stored dtype (seen on an
    H200: the float32 tiny base gave a float32 merge), so a base stored in another dtype than the merge
    dtype is merged with peft, which merges in the merge dtype. Returns (backend, note or None)."""
    stored = stored_dtypes(base_dir)
    if backend == "unsloth" and stored != {SAFETENSORS_DTYPE[dtype_name]}:
        return "transformers", (f"{base_dir} is stored as {sorted(stored)}, not {dtype_name}: merging with peft "
                                "(unsloth's merged save keeps the stored dtype)")
    return backend, None


def check_saved_dtype(out_dir, dtype_name):
    """Every saved tensor in the merge dtype: no 4-bit packed or float32 leftovers."""
    want = SAFETENSORS_DTYPE[dtype_name]
    found = stored_dtypes(out_dir)
    if found != {want}:
        raise UserError(f"{out_dir}: the merged weights are {sorted(found)}, expected only {want}")
    return want


def finish_folder(out_dir, base_config, processor, family):
    """What servers need beside the weights, each a known failure of merged Gemma 3 folders:
    the base's `architectures`, a generation config stopping at the family's end-of-turn token, the
    processor (image processor + tokenizer) and the chat template. Returns the list of files written."""
    from transformers import GenerationConfig

    out_dir = Path(out_dir)
    for stale in out_dir.glob("*.bin"):  # safetensors only: vLLM and transformers prefer them
        stale.unlink()
    if not next(out_dir.glob("*.safetensors"), None):
        raise UserError(f"{out_dir}: the merge wrote no safetensors weights")
    config_path = out_dir / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["architectures"] = base_config.get("architectures") or [family.ARCHITECTURE]
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    processor.save_pretrained(str(out_dir))
    if not getattr(processor, "chat_template", None):
        raise UserError("models/lora and the base have no chat template (the server could not build prompts)")
    tokenizer = processor.tokenizer
    try:
        generation = GenerationConfig.from_pretrained(str(out_dir))
    except OSError:
        generation = GenerationConfig(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    eos = generation.eos_token_id if generation.eos_token_id is not None else tokenizer.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else [eos]
    # a chat answer ends with the family's end-of-turn (Gemma 3: <end_of_turn>), not <eos>
    generation.eos_token_id = list(dict.fromkeys(eos + stop_token_ids(tokenizer, family.STOP_TOKENS)))
    generation.save_pretrained(str(out_dir))
    make_readable(out_dir)
    return sorted(p.name for p in out_dir.iterdir())
