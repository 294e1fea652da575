"""LoRA supervised fine-tuning of a VLM (a family of stages/lib/families/) on OCR rows: used by the train and search stages.

Contract (signatures are stable):
  training_config(params, overrides=None) -> dict
      The validated top-level training keys of params.yaml (TRAINING_KEYS), with `overrides`
      (e.g. a search trial's values) applied on top, plus "image": params `image:` (the
      processor settings, stages/lib/modeling.py image_settings). A bad or unknown key raises
      UserError naming it, before anything heavy happens.
  OcrCollator(processor, instruction, max_seq_length=None)(rows) -> batch of tensors
      The one batch builder of both backends (see its docstring); trainable_modules(model, family) ->
      {module group: trainable parameter count}, the same on both backends. What differs per
      model family (LoRA towers and module kinds, the projector in modules_to_save) comes from
      stages/lib/families/ (family_of(base_dir)).
  split_train_val(rows, val_ratio, seed) -> (train_rows, val_rows)
      Seeded split of the non-test rows; whole documents (image folders) go to one side.
  run_training(config, base_dir, train_rows, val_rows, output_dir, *, callbacks=(),
               live_dir=None, resume=False, checkpoint_dir=None, measure_cer=True) -> dict
      Trains LoRA adapters (TRL SFTTrainer with OcrCollator; unsloth's model on CUDA when chosen), evaluating
      eval_loss every `eval_steps` optimizer steps, and with val_cer_rows > 0 the greedy CER on a fixed sample
      of val_rows (ValCerCallback: eval_val_cer in the evaluation's metrics, dvclive eval/val_cer),
      and saves the BEST adapter (lowest `best_metric`: eval_loss or val_cer) + processor files to
      output_dir. `callbacks` are transformers.TrainerCallback objects (the search reports
      eval_loss to Optuna from on_evaluate and may raise optuna.TrialPruned: exceptions
      propagate; they are detached before the final evaluation of the best checkpoint). `live_dir`: dvclive folder for per-step train loss / per-eval eval_loss.
      `resume`: continue from the last checkpoint in checkpoint_dir (default
      output_dir + ".checkpoints"; git-ignored, deleted after a finished run). Returns the
      final metrics: train_loss, eval_loss (of the saved best adapter), best_metric, best_eval_loss and
      best_val_cer (at the best step), best_step, global_step, runtime_s, samples_per_second, peak_rss_mib,
      cuda_max_memory_allocated_mib, device (stages/lib/runtime.py; the train stage moves these to
      metrics/runtime/train.json), trainable_params, total_params, trainable_modules, cut_rows (rows cut at
      max_seq_length), backend, and with measure_cer val_cer / val_cer_base (greedy CER, raw text, on val_rows
      of the fine-tuned model and of the base: the same model with its adapter disabled; val_cer_ci95_low/high
      its bootstrap interval), num_processes and
      distributed_backend (gloo, nccl; None for one process). Under torchrun (num_processes > 1,
      stages/lib/launch.py) only rank 0 writes and returns the metrics; the other ranks return None.
  choose_backend(config) -> "unsloth" | "transformers" (UserError for what cannot run here:
      unsloth without CUDA, load_in_4bit without CUDA).
"""
import random
from collections import defaultdict
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import params as P
from .cli import UserError
from .modeling import IMAGE_PARAMS, image_settings

BACKENDS = ("auto", "unsloth", "transformers")
BEST_METRICS = ("eval_loss", "val_cer")


def _param(default, help, **check):
    """One training hyperparameter: its default, what it does, and its check (params.get options)."""
    return field(default=default, metadata={"help": help, "check": check})


@dataclass(frozen=True)
class TrainingConfig:
    """Every training hyperparameter, declared once: name, type, default, check.

    Each is a top-level key of params.yaml of the same name (so `dvc exp run -S lora_r=8` works);
    the train and search stages read exactly these (their PARAMS, checked against dvc.yaml by
    tests/test_dvc_yaml.py), and the search space may only name these. Adding one = one line here,
    its value in params.yaml, and its name in the train and search `params:` of dvc.yaml (the test
    fails until it is there)."""
    model_name: str = _param("tiny", "'tiny' (built offline by the base stage) or a local checkpoint folder")
    instruction: str = _param("請給我 OCR 結果", "the OCR instruction of every prompt")
    backend: str = _param("auto", "auto | unsloth | transformers", choices=BACKENDS)
    seed: int = _param(42, "training and train/validation split seed", minimum=0)
    val_ratio: float = _param(0.1, "share of the non-test split held out for validation", maximum=0.9, positive=True)
    lora_r: int = _param(16, "LoRA rank", minimum=1)
    lora_alpha: float = _param(32.0, "LoRA alpha", positive=True)
    lora_dropout: float = _param(0.0, "LoRA dropout", minimum=0.0, maximum=0.99)
    learning_rate: float = _param(5.0e-3, "peak learning rate (cosine schedule)", positive=True)
    num_train_epochs: float = _param(25.0, "epochs over the training rows", positive=True)
    per_device_train_batch_size: int = _param(16, "rows per optimizer micro-step, split evenly across num_processes",
                                              minimum=1)
    gradient_accumulation_steps: int = _param(1, "micro-batches per optimizer step", minimum=1)
    warmup_ratio: float = _param(0.1, "share of the steps spent warming up", minimum=0.0, maximum=0.99)
    weight_decay: float = _param(0.0, "AdamW weight decay", minimum=0.0)
    max_seq_length: int = _param(8192, "longest training sequence in tokens (null: no limit)", minimum=1,
                                 allow_none=True)
    load_in_4bit: bool = _param(False, "QLoRA on a 4-bit base (CUDA only)")
    finetune_vision_layers: bool = _param(True, "LoRA on the vision tower")
    finetune_language_layers: bool = _param(True, "LoRA on the language model")
    finetune_attention_modules: bool = _param(True, "LoRA on attention projections")
    finetune_mlp_modules: bool = _param(True, "LoRA on MLP projections")
    eval_steps: int = _param(25, "evaluate eval_loss every N optimizer steps", minimum=1)
    val_cer_rows: int = _param(16, "validation rows read greedily at every evaluation for the CER during training "
                                   "(a fixed seeded sample; 0: none)", minimum=0)
    best_metric: str = _param("eval_loss", "the checkpoint kept: lowest eval_loss or lowest val_cer (needs "
                                           "val_cer_rows > 0)", choices=BEST_METRICS)
    logging_steps: int = _param(5, "log the train loss every N steps", minimum=1)
    report_to: str = _param("none", "extra transformers trackers, e.g. wandb (dvclive is always on)")
    num_processes: int = _param(1, "data-parallel training processes on this machine (torchrun; one GPU each); "
                                   "the same global batch, so the same loss curve", minimum=1)


# How the train stage runs, not what it trains: the search's Optuna trials run in one process, so the
# search does not read these (it trains with num_processes 1 and is not re-run when they change).
LAUNCH_KEYS = ("num_processes",)


TRAINING_FIELDS = {f.name: f for f in fields(TrainingConfig)}
TRAINING_KEYS = tuple(TRAINING_FIELDS)
# What the train and search stages read from params.yaml: the training keys and the image settings.
TRAINING_PARAMS = (*TRAINING_KEYS, IMAGE_PARAMS)


def field_type(f):
    return {"str": str, "int": int, "float": float, "bool": bool}[f.type if isinstance(f.type, str) else f.type.__name__]


def training_config(params, overrides=None):
    """Validated training keys from params (top level), `overrides` applied first."""
    merged = {key: params.get(key) for key in TRAINING_KEYS if key in params}
    for key, value in (overrides or {}).items():
        if key not in TRAINING_FIELDS:
            raise UserError(f"params.yaml: unknown training parameter '{key}' (known: {', '.join(TRAINING_KEYS)})")
        merged[key] = value
    config = {}
    for key, f in TRAINING_FIELDS.items():
        if key not in merged:
            raise UserError(f"params.yaml: missing training parameter '{key}' ({f.metadata['help']}; "
                            f"default {f.default!r})")
        check = dict(f.metadata["check"])
        positive = check.pop("positive", False)
        config[key] = P.get(merged, key, field_type(f), **check)
        if positive and config[key] <= 0:
            raise UserError(f"params.yaml: '{key}' must be > 0, got {config[key]!r}")
    if not config["instruction"].strip():
        raise UserError("params.yaml: 'instruction' must not be empty")
    if not (config["finetune_vision_layers"] or config["finetune_language_layers"]):
        raise UserError("params.yaml: 'finetune_vision_layers' and 'finetune_language_layers' are both false (nothing to train)")
    if config["per_device_train_batch_size"] % config["num_processes"]:
        raise UserError(f"params.yaml: 'per_device_train_batch_size' {config['per_device_train_batch_size']} is not "
                        f"divisible by 'num_processes' {config['num_processes']} (each process takes an equal share "
                        "of the batch)")
    if config["best_metric"] == "val_cer" and not config["val_cer_rows"]:
        raise UserError("params.yaml: 'best_metric' val_cer needs 'val_cer_rows' > 0 (no CER is measured during training)")
    if not (config["finetune_attention_modules"] or config["finetune_mlp_modules"]):
        raise UserError("params.yaml: 'finetune_attention_modules' and 'finetune_mlp_modules' are both false (nothing to train)")
    config["image"] = image_settings(params)   # params `image:` (stages/lib/modeling.py), not searchable
    return config


# Values for the 1.4 M-parameter demo base (trained from random init) that LoRA on a real 4B-27B
# checkpoint does not take: an order of magnitude too hot or too long (the README's real-checkpoint
# command uses the original project's: learning rate 2e-4, 5 epochs, batch 1, gradient accumulation 4).
DEMO_LIMITS = {"learning_rate": 1.0e-3, "num_train_epochs": 10}


def demo_value_warnings(config, space=None):
    """Warnings (strings) when a real checkpoint (model_name not 'tiny') gets the demo's values:
    a learning rate >= 1e-3 or more than 10 epochs, in the config or at the top of the search space."""
    if config["model_name"] == "tiny":
        return []
    found = {key: config[key] for key in DEMO_LIMITS if config[key] >= DEMO_LIMITS[key]}
    for key, spec in (space or {}).items():
        high = spec.get("high", max(spec.get("choices") or [0], default=0)) if isinstance(spec, dict) else None
        if key in DEMO_LIMITS and isinstance(high, (int, float)) and high >= DEMO_LIMITS[key]:
            found[f"search.space.{key} up to"] = high
    return [f"warning: {key} {value:g} with the real checkpoint '{config['model_name']}': that is the tiny demo's "
            f"value (LoRA on a real checkpoint: learning_rate ~2e-4, 2-5 epochs; see the README's GPU command)"
            for key, value in found.items()]


def shuffled_documents(rows, seed):
    """The rows grouped by document (image folder; each line its own when all share one folder), the
    documents in a seeded order: [(key, [rows])]. The train/validation split and the learning curve's
    nested subsets both keep a document on one side."""
    groups = defaultdict(list)
    for row in rows:
        groups[str(Path(row["image_path"]).parent)].append(row)
    if len(groups) < 2:  # a single folder: split lines instead of documents
        groups = {str(i): [row] for i, row in enumerate(rows)}
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    return [(key, groups[key]) for key in keys]


def split_train_val(rows, val_ratio, seed):
    """Shuffle documents (image folders) with `seed`; fill validation up to round(n * val_ratio) rows."""
    documents = shuffled_documents(rows, seed)
    groups = dict(documents)
    keys = [key for key, _ in documents]
    target = max(1, round(len(rows) * val_ratio))
    train, val = [], []
    for key in keys:
        side = val if len(val) < target and len(val) + len(groups[key]) / 2 <= target else train
        side.extend(groups[key])
    if not train or not val:
        raise UserError(f"params.yaml: 'val_ratio' {val_ratio} leaves {len(train)} training and {len(val)} "
                        f"validation rows out of {len(rows)}")
    return train, val


def choose_backend(config):
    """'unsloth' on CUDA with unsloth installed (or when asked), else 'transformers'; refuses what cannot run."""
    import importlib.util

    import torch

    cuda, has_unsloth = torch.cuda.is_available(), importlib.util.find_spec("unsloth") is not None
    backend = config["backend"]
    if backend == "auto":
        backend = "unsloth" if cuda and has_unsloth else "transformers"
    if backend == "unsloth" and not cuda:
        raise UserError("params.yaml: 'backend' unsloth needs a CUDA GPU (use 'auto' or 'transformers' on a CPU)")
    if backend == "unsloth" and not has_unsloth:
        raise UserError("params.yaml: 'backend' unsloth is not installed (pip install -r requirements-gpu.txt)")
    if config["load_in_4bit"] and not cuda:
        # Measured here: bitsandbytes NF4 QLoRA does train on the CPU (bf16 autocast), but reloading the
        # best checkpoint gave eval_loss 0.22 where that checkpoint had scored 0.12, and the field notes
        # saw zero gradients after a generate(). Not trustworthy enough to keep as a CPU path.
        raise UserError("params.yaml: 'load_in_4bit' needs a CUDA GPU (4-bit QLoRA on the CPU is not reliable "
                        "here); set it to false on this machine")
    return backend


def lora_targets(model, config, family):
    """Full names of the Linear layers LoRA wraps: the family's towers (stages/lib/families/) and
    module kinds the finetune_* flags pick; not those inside the fully trained MODULES_TO_SAVE."""
    import torch

    kinds = set()
    if config["finetune_attention_modules"]:
        kinds |= set(family.ATTENTION_MODULES)
    if config["finetune_mlp_modules"]:
        kinds |= set(family.MLP_MODULES)
    towers = [t for t, on in ((family.VISION_TOWER, config["finetune_vision_layers"]),
                              (family.LANGUAGE_MODEL, config["finetune_language_layers"])) if on]
    def kind(name):   # Gemma 4's vision tower wraps its Linear layers: q_proj.linear
        return name.removesuffix(family.LINEAR_WRAPPED).rsplit(".", 1)[-1]

    names = [name for name, module in model.named_modules()
             if kind(name) in kinds and any(f".{t}." in f".{name}" for t in towers)
             and not any(f".{m}." in f".{name}" for m in family.MODULES_TO_SAVE)
             and (isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear4bit")]
    if not names:
        raise UserError("params.yaml: the finetune_* flags select no Linear layer of this model")
    return names


# Per-token keys the processor returns beside input_ids (Gemma 3: token_type_ids marks image tokens);
# every other key it returns (pixel_values, a family's image grid or crop counts) is per image.
SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


class OcrCollator:
    """The one batch builder of both backends (transformers + peft, and unsloth: unsloth supplies the
    model and its kernels, never the pixels or the masking), of the validation loss, and of
    tools/gpu_check.sh's comparison.

        collator = OcrCollator(processor, instruction, max_seq_length)   # processor: load_processor(dir, image)
        batch = collator(rows)   # rows: split rows {"image_path", "ocr_text", ...} -> dict of tensors
        collator.cut_rows        # image_path of every row whose answer was cut at max_seq_length

    Each row: the image read by the one loader (stages/lib/images.py), the prompt of
    stages/lib/prompt.py through the processor with its image settings (params `image:`, applied by
    load_processor), then the answer as the chat template writes it (its end-of-turn included).
    labels are -100 except on the answer tokens: the loss falls on the answer only. Right-padded.
    A row longer than max_seq_length keeps its start and is counted in cut_rows (never silently);
    one whose prompt alone reaches it (image tokens would be cut) is refused with a UserError."""

    def __init__(self, processor, instruction, max_seq_length=None):
        from .prompt import generation_prompt, user_turn

        self.processor, self.max_seq_length = processor, max_seq_length
        self.prompt = generation_prompt(processor, instruction)
        self._turn = user_turn(instruction)
        self.cut_rows = set()

    @staticmethod
    def read_image(row):
        """The row's image, by the one loader: the pixels a served model is sent (stages/lib/prompt.py)."""
        from .images import load_image

        return load_image(row["image_path"])

    def answer_text(self, text):
        """The answer as the chat template writes it after the prompt (e.g. 'TEXT<end_of_turn>\n')."""
        full = self.processor.apply_chat_template(
            [self._turn, {"role": "assistant", "content": [{"type": "text", "text": text}]}], tokenize=False)
        if not full.startswith(self.prompt):
            raise UserError("the chat template does not write the answer after the generation prompt: "
                            "training and evaluation would see different prompts")
        return full[len(self.prompt):]

    def encode(self, row):
        """One row: {key: tensor} with sequence keys of shape [length] and the per-image keys as the
        processor returns them, plus labels and prompt_length."""
        import torch

        inputs = self.processor(text=[self.prompt], images=[[self.read_image(row)]], return_tensors="pt",
                                add_special_tokens=False)
        answer = self.processor.tokenizer(self.answer_text(row["ocr_text"]), add_special_tokens=False,
                                          return_tensors="pt")["input_ids"][0]
        prompt_length = inputs["input_ids"].shape[1]
        out = {"prompt_length": prompt_length}
        for key, value in inputs.items():
            if key in SEQUENCE_KEYS:
                tail = answer if key == "input_ids" else torch.full_like(answer, int(key == "attention_mask"))
                out[key] = torch.cat([value[0], tail])
            else:
                out[key] = value
        out["labels"] = torch.cat([torch.full((prompt_length,), -100, dtype=answer.dtype), answer])
        limit = self.max_seq_length
        if limit is not None and len(out["input_ids"]) > limit:
            if prompt_length >= limit:
                raise UserError(f"params.yaml: 'max_seq_length' {limit} would cut the prompt of "
                                f"'{row['image_path']}' ({prompt_length} tokens, image tokens included): raise it")
            self.cut_rows.add(row["image_path"])
            for key in (*SEQUENCE_KEYS, "labels"):
                if key in out:
                    out[key] = out[key][:limit]
        return out

    def __call__(self, rows):
        import torch

        encoded = [self.encode(row) for row in rows]
        width = max(len(e["input_ids"]) for e in encoded)
        pad_id = self.processor.tokenizer.pad_token_id
        batch = {}
        for key in encoded[0]:
            if key == "prompt_length":
                continue
            if key in SEQUENCE_KEYS or key == "labels":
                fill = {"input_ids": pad_id, "labels": -100}.get(key, 0)
                batch[key] = torch.stack([torch.cat([e[key], torch.full((width - len(e[key]),), fill,
                                                                         dtype=e[key].dtype)]) for e in encoded])
            else:
                batch[key] = torch.cat([e[key] for e in encoded])
        return batch


def trainable_modules(model, family):
    """{module group: trainable parameter count}, grouped by what they are: 'lora:vision_tower',
    'lora:language_model', 'multi_modal_projector' (modules_to_save), ... (the family's names,
    stages/lib/families/). The same on both backends."""
    groups = (*family.MODULES_TO_SAVE, family.VISION_TOWER, family.LANGUAGE_MODEL)
    counts = defaultdict(int)
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        group = next((g for g in groups if f".{g}." in f".{name}."), "other")
        lora = any(p.startswith("lora_") for p in name.split("."))
        counts[f"lora:{group}" if lora else group] += param.numel()
    return dict(sorted(counts.items()))


def check_row_lengths(base_dir, rows, config):
    """Refuse, before any heavy work, rows whose prompt + answer is longer than max_seq_length or the
    model's context: they would be cut (or, past the context, train very slowly and uselessly)."""
    from .modeling import context_length, load_processor, prompt_length

    processor = load_processor(base_dir)
    tokenizer = processor.tokenizer
    context = context_length(base_dir)
    limits = [(v, name) for v, name in ((config["max_seq_length"], "max_seq_length"),
                                        (context, f"the model's context ({base_dir}/config.json)")) if v]
    if not limits:
        return
    limit, what = min(limits)
    prompt = prompt_length(base_dir, tokenizer, config["instruction"], config.get("image"))
    answers = tokenizer([r["ocr_text"] for r in rows], add_special_tokens=False)["input_ids"]
    too_long = [(i, prompt + len(ids) + 1) for i, ids in enumerate(answers) if prompt + len(ids) + 1 > limit]
    if too_long:
        i, n = too_long[0]
        raise UserError(f"{len(too_long)} of {len(rows)} training/validation rows are longer than {what}, {limit} "
                        f"tokens (first: '{rows[i]['image_path']}', about {n} tokens, label "
                        f"{len(rows[i]['ocr_text'])} characters): split such pages into smaller images, raise "
                        "max_seq_length, or use a model with a longer context")


def last_complete_checkpoint(checkpoint_dir):
    """The newest checkpoint-N that was written to the end (its trainer_state.json, the Trainer's last
    file, is whole JSON), or None. A run killed while writing checkpoint-N leaves it incomplete:
    resuming goes on from the one before."""
    import json
    import re

    found = []
    for folder in Path(checkpoint_dir).glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and folder.is_dir():
            found.append((int(match.group(1)), folder))
    for step, folder in sorted(found, reverse=True):
        try:
            json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
            return str(folder)
        except (OSError, ValueError):
            print(f"note: {folder} is incomplete (the run stopped while writing it): resuming from an earlier one")
    return None


def sort_adapter_config(folder):
    """peft writes target_modules from a set, in a different order each run: sorted, identical training
    gives an identical adapter_config.json (and `dvc status` sees no change)."""
    import json

    path = Path(folder) / "adapter_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


class LiveCallback:
    """dvclive logging inside a stage (no dvc.yaml rewrite, no experiment): train loss at every
    logging step, eval_loss at every evaluation, x = the trainer's global step."""

    def __new__(cls, live_dir, resume=False):
        from dvclive import Live
        from transformers import TrainerCallback

        class _Live(TrainerCallback):
            def __init__(self):
                self.live = Live(dir=str(live_dir), resume=resume, dvcyaml=False, save_dvc_exp=False, report=None)

            def on_log(self, args, state, control, logs=None, **kwargs):
                metrics = {("train/loss" if k == "loss" else k.replace("eval_", "eval/", 1)): v
                           for k, v in (logs or {}).items() if k in ("loss", "eval_loss")}
                if metrics:
                    self.live.step = state.global_step
                    for name, value in metrics.items():
                        self.live.log_metric(name, float(value))
                    self.live.make_summary()

            def on_evaluate(self, args, state, control, metrics=None, **kwargs):
                # ValCerCallback adds eval_val_cer to the metrics after the trainer logged them: log it here
                if (metrics or {}).get(VAL_CER) is not None:
                    self.live.step = state.global_step
                    self.live.log_metric("eval/val_cer", float(metrics[VAL_CER]))
                    self.live.make_summary()

            def on_train_end(self, args, state, control, **kwargs):
                self.live.end()
        return _Live()


VAL_CER = "eval_val_cer"  # the evaluation metric's name: the trainer prefixes metric_for_best_model with eval_


def val_cer_sample(val_rows, n, seed):
    """The fixed validation rows read at every evaluation: a seeded sample of n, in their split order."""
    if n >= len(val_rows):
        return list(val_rows)
    keep = set(random.Random(seed).sample(range(len(val_rows)), n))
    return [row for i, row in enumerate(val_rows) if i in keep]


def greedy_readings(model, processor, rows, instruction, budget, *, bf16=False, backend="transformers"):
    """Greedy readings of `rows` by `model`: the one reader of the CER during training and of the learning
    curve (bf16 training can leave bf16 trainable weights, so it generates under autocast then)."""
    import torch

    from .images import load_image
    from .modeling import read_images

    if backend == "unsloth":
        from unsloth import FastVisionModel

        FastVisionModel.for_inference(model)
    try:
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
            return read_images(model, processor, [load_image(r["image_path"]) for r in rows], instruction,
                               max_new_tokens=budget)
    finally:
        if backend == "unsloth":
            FastVisionModel.for_training(model)


def greedy_cer(model, processor, rows, instruction, budget, **how):
    """Corpus CER of greedy_readings of `rows` (strings as given, like val_cer)."""
    from .metrics import corpus_cer

    return corpus_cer([r["ocr_text"] for r in rows], greedy_readings(model, processor, rows, instruction, budget, **how))


class ValCerCallback:
    """At every evaluation, the greedy CER on a fixed sample of validation rows, added to the evaluation's
    metrics as eval_val_cer (in place: the trainer then picks the best checkpoint by it when best_metric
    is val_cer) and to the log history. Rank 0 reads; under torchrun it sends the value to the others,
    so every rank keeps the same best checkpoint."""

    def __new__(cls, processor, rows, instruction, budget, backend):
        from transformers import TrainerCallback

        class _ValCer(TrainerCallback):
            def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
                if metrics is None or "eval_loss" not in metrics:
                    return
                value = None
                if args.process_index == 0:
                    value = greedy_cer(model, processor, rows, instruction, budget, bf16=args.bf16, backend=backend)
                value = broadcast_from_rank0(value)
                metrics[VAL_CER] = value
                if state.log_history and state.log_history[-1].get("step") == state.global_step \
                        and "eval_loss" in state.log_history[-1]:
                    state.log_history[-1][VAL_CER] = value
        return _ValCer()


def broadcast_from_rank0(value):
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def import_unsloth_first(backend):
    """unsloth patches trl, transformers and peft when imported, so it must come before them."""
    if backend == "unsloth":
        import unsloth  # noqa: F401


def unsloth_max_seq_length(config, base_dir):
    """What unsloth is told (FastVisionModel.from_pretrained max_seq_length, default 2048, which its
    trainer otherwise caps args.max_length to): max_seq_length, or the model's context when null."""
    from .modeling import context_length

    return config["max_seq_length"] or context_length(base_dir) or 131072


def load_for_training(config, base_dir, backend):
    """(model with LoRA adapters, processor) for the chosen backend. The processor is ours on both
    (load_processor with the `image` settings); the LoRA targets (lora_targets) and the family's
    MODULES_TO_SAVE (the projector, trained fully) are the same on both: params alone decide what trains."""
    import torch

    from .families import family_image_settings, family_of
    from .modeling import load_model, load_processor

    family = family_of(base_dir)
    processor = load_processor(base_dir, family_image_settings(family, config.get("image")))
    if backend == "unsloth":
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(str(base_dir), load_in_4bit=config["load_in_4bit"],
                                                   max_seq_length=unsloth_max_seq_length(config, base_dir),
                                                   use_gradient_checkpointing="unsloth", trust_remote_code=False)
        # explicit full-name targets; the finetune_* flags are already applied by lora_targets (left
        # True here, unsloth would otherwise filter the list again through its own regex)
        model = FastVisionModel.get_peft_model(
            model, r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
            target_modules=lora_targets(model, config, family), modules_to_save=list(family.MODULES_TO_SAVE),
            finetune_vision_layers=True, finetune_language_layers=True, finetune_attention_modules=True,
            finetune_mlp_modules=True, bias="none", random_state=config["seed"])
        return model, processor
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    model = load_model(base_dir, load_in_4bit=config["load_in_4bit"], dtype=torch.bfloat16 if bf16 else None)
    if config["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=torch.cuda.is_available())
    lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      target_modules=lora_targets(model, config, family), modules_to_save=list(family.MODULES_TO_SAVE),
                      bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, lora), processor


def sft_config(config, checkpoint_dir, backend):
    import torch
    from trl import SFTConfig

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()  # Gemma 3 trains in bf16 (fp16 gives NaN)
    report_to = [t.strip() for t in config["report_to"].split(",") if t.strip() and t.strip() != "none"]
    # Both backends: rows stay {image_path, ocr_text} (nothing dropped, nothing prepared by TRL);
    # OcrCollator builds every batch. max_length: unsloth reads it; TRL does not cut unprepared rows.
    extra = {"remove_unused_columns": False, "dataset_text_field": "", "dataset_kwargs": {"skip_prepare_dataset": True}}
    # Data-parallel: each process takes its share of the batch, so the global batch (and the optimizer
    # steps, the schedule and the loss curve) stay those of one process. Every rank gets the same seeds:
    # the same LoRA init and the same shuffled order, of which accelerate hands each rank its slice.
    per_process = config["per_device_train_batch_size"] // config["num_processes"]
    # transformers 5.24 renamed gradient_checkpointing (a FutureWarning on every run); the GPU set's 5.17 has only the old name
    names = {f.name for f in fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    extra[checkpointing] = cuda and backend != "unsloth"
    return SFTConfig(
        output_dir=str(checkpoint_dir), seed=config["seed"], data_seed=config["seed"],
        learning_rate=config["learning_rate"], num_train_epochs=config["num_train_epochs"],
        per_device_train_batch_size=per_process, per_device_eval_batch_size=per_process,
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        warmup_steps=config["warmup_ratio"], weight_decay=config["weight_decay"], lr_scheduler_type="cosine",
        max_grad_norm=1.0, logging_steps=config["logging_steps"], eval_strategy="steps",
        eval_steps=config["eval_steps"], save_strategy="steps", save_steps=config["eval_steps"], save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model=config["best_metric"], greater_is_better=False,
        max_length=config["max_seq_length"], bf16=bf16,
        dataloader_pin_memory=cuda, use_cpu=not cuda,
        ddp_find_unused_parameters=False,  # every trainable weight is used in each forward: skip DDP's graph walk
        report_to=report_to or "none", **extra)


def run_training(config, base_dir, train_rows, val_rows, output_dir, *, callbacks=(), live_dir=None,
                 resume=False, checkpoint_dir=None, measure_cer=True):
    """Train LoRA adapters; save the best adapter + processor to output_dir; return the final metrics.
    Under torchrun (num_processes > 1) every rank trains its share of each batch and only rank 0 writes
    anything (checkpoint folder set-up, dvclive, validation CER, the adapter): the others return None."""
    import os
    import shutil
    import time

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != config["num_processes"]:
        raise UserError(f"params.yaml: 'num_processes' is {config['num_processes']} but {world} processes were "
                        "launched (run `python -m stages.train`: it starts torchrun itself)")
    backend = choose_backend(config)
    import_unsloth_first(backend)
    import torch
    from trl import SFTTrainer

    from .families import family_of
    from .images import load_image
    from .io import MARKER, MARKER_TEXT, atomic_dir, check_replaceable, read_json
    from .metrics import bootstrap_intervals, corpus_cer, score_pairs
    from .modeling import generation_budget, read_images
    from .runtime import peaks, reset_peaks

    reset_peaks()  # the run's own peak memory (a search or the curve trains several times in one process)
    checkpoint_dir = Path(checkpoint_dir or f"{output_dir}.checkpoints")
    last = last_complete_checkpoint(checkpoint_dir) if resume and checkpoint_dir.is_dir() else None
    args = sft_config(config, checkpoint_dir, backend)
    main = args.process_index == 0
    # main_process_first starts the process group (gloo on CPUs, NCCL on GPUs) and holds the other
    # ranks until rank 0 has set up the shared checkpoint folder.
    with args.main_process_first(local=False, desc="checkpoint folder"):
        if main:
            if resume and last is None:
                print(f"note: no checkpoint in {checkpoint_dir}: starting from the beginning")
            if not last and checkpoint_dir.exists():
                check_replaceable(checkpoint_dir)   # a folder the stage wrote, never one of the user's
                shutil.rmtree(checkpoint_dir)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / ".gitignore").write_text("*\n")  # never committed; deleted after a finished run
            (checkpoint_dir / MARKER).write_text(MARKER_TEXT)

    check_row_lengths(base_dir, train_rows + val_rows, config)   # before the model is loaded
    torch.manual_seed(config["seed"])
    model, processor = load_for_training(config, base_dir, backend)
    collator = OcrCollator(processor, config["instruction"], config["max_seq_length"])
    collator(val_rows[:1])   # refuses, before training, a max_seq_length that cuts a prompt
    collator.cut_rows.clear()
    # the evaluation's rule (evaluate.max_tokens 'auto'): room for the longest label, so nothing is cut
    budget, _ = generation_budget(processor.tokenizer, [r["ocr_text"] for r in train_rows + val_rows],
                                  base_dir, config["instruction"])
    cer = [ValCerCallback(processor, val_cer_sample(val_rows, config["val_cer_rows"], config["seed"]),
                          config["instruction"], budget, backend)] if config["val_cer_rows"] else []
    live = [LiveCallback(live_dir, resume=bool(last))] if live_dir and main else []
    # the CER first: the others' on_evaluate (dvclive, the search's pruner) see it in the metrics
    trainer = SFTTrainer(model=model, args=args, train_dataset=split_dataset(train_rows),
                         eval_dataset=split_dataset(val_rows), data_collator=collator, processing_class=processor,
                         callbacks=cer + list(callbacks) + live)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    modules = trainable_modules(model, family_of(base_dir))
    total = sum(p.numel() for p in model.parameters())
    start = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    runtime = time.time() - start
    # The evaluation below (the best checkpoint) is not a training step: no curve point, no report.
    for callback in [*cer, *callbacks, *live]:
        trainer.remove_callback(callback)
    final_eval = trainer.evaluate()  # the best checkpoint, reloaded by load_best_model_at_end (every rank)
    if not main:  # the checkpoints (saved by rank 0) are no longer read: the rest is rank 0's alone
        return None
    import torch.distributed as dist

    metrics = {
        "train_loss": result.training_loss, "eval_loss": final_eval["eval_loss"],
        "best_metric": config["best_metric"], "best_step": step_of(trainer.state.best_model_checkpoint),
        "global_step": trainer.state.global_step, "runtime_s": round(runtime, 2),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable, "total_params": total, "trainable_modules": modules,
        "cut_rows": len(collator.cut_rows), "train_rows": len(train_rows),
        "val_rows": len(val_rows), "backend": backend, "load_in_4bit": config["load_in_4bit"],
        "num_processes": world, "distributed_backend": dist.get_backend() if dist.is_initialized() else None,
        **best_evaluation(trainer.state), **peaks(),
    }
    if measure_cer:
        if backend == "unsloth":
            from unsloth import FastVisionModel

            FastVisionModel.for_inference(model)
        refs = [r["ocr_text"] for r in val_rows]
        images = [load_image(r["image_path"]) for r in val_rows]
        def amp():  # bf16 training can leave bf16 trainable weights: generate under autocast too
            return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(trainer.args.bf16))
        cut, cut_base = {}, {}
        with amp():
            preds = read_images(model, processor, images, config["instruction"], max_new_tokens=budget, stats=cut)
        metrics["val_cer"] = corpus_cer(refs, preds)
        # how far a few validation rows can be trusted (train.py warns on a tiny split with it)
        (low, high), _ = bootstrap_intervals(score_pairs(refs, preds), 1000, config["seed"])
        metrics.update(val_cer_ci95_low=low, val_cer_ci95_high=high)
        with amp(), model.disable_adapter():
            metrics["val_cer_base"] = corpus_cer(refs, read_images(model, processor, images, config["instruction"],
                                                                   max_new_tokens=budget, stats=cut_base))
        metrics.update(val_max_new_tokens=budget, val_truncated=cut.get("truncated", 0),
                       val_truncated_base=cut_base.get("truncated", 0))
    with atomic_dir(output_dir, inputs=[base_dir]) as tmp:
        model.save_pretrained(tmp)
        sort_adapter_config(tmp)
        processor.save_pretrained(tmp)
        saved = read_json(Path(tmp) / "adapter_config.json")   # what the artifact says, not what we asked for
        metrics.update(adapter_r=saved.get("r"), adapter_lora_alpha=saved.get("lora_alpha"))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def best_evaluation(state):
    """best_eval_loss and best_val_cer (None when not measured): the evaluation of the kept checkpoint."""
    step = step_of(state.best_model_checkpoint)
    entry = next((e for e in state.log_history if e.get("step") == step and "eval_loss" in e), {})
    return {"best_eval_loss": entry.get("eval_loss"), "best_val_cer": entry.get(VAL_CER)}


def step_of(checkpoint_path):
    return int(str(checkpoint_path).rsplit("-", 1)[-1]) if checkpoint_path else None


def split_dataset(rows):
    """The split's rows as a datasets.Dataset of {image_path, ocr_text}: OcrCollator reads the images."""
    from datasets import Dataset

    return Dataset.from_list([{"image_path": r["image_path"], "ocr_text": r["ocr_text"]} for r in rows])
