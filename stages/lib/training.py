"""LoRA supervised fine-tuning of a VLM (a family of stages/lib/families/) on OCR rows: used by the train and search stages.

Contract (signatures are stable):
  training_config(params, overrides=None) -> dict
      The validated top-level training keys of params.yaml (TRAINING_KEYS), with `overrides`
      (e.g. a search trial's values) applied on top. A bad or unknown key raises UserError
      naming it, before anything heavy happens.
  split_train_val(rows, val_ratio, seed) -> (train_rows, val_rows)
      Seeded split of the non-test rows; whole documents (image folders) go to one side.
  run_training(config, base_dir, train_rows, val_rows, output_dir, *, callbacks=(),
               live_dir=None, resume=False, checkpoint_dir=None, measure_cer=True) -> dict
      Trains LoRA adapters (TRL SFTTrainer; unsloth on CUDA when chosen), evaluating eval_loss
      every `eval_steps` optimizer steps, and saves the BEST adapter + processor files to
      output_dir. `callbacks` are transformers.TrainerCallback objects (the search reports
      eval_loss to Optuna from on_evaluate and may raise optuna.TrialPruned: exceptions
      propagate; they are detached before the final evaluation of the best checkpoint). `live_dir`: dvclive folder for per-step train loss / per-eval eval_loss.
      `resume`: continue from the last checkpoint in checkpoint_dir (default
      output_dir + ".checkpoints"; git-ignored, deleted after a finished run). Returns the
      final metrics: train_loss, eval_loss (of the saved best adapter), best_eval_loss,
      best_step, global_step, runtime_s, samples_per_second, trainable_params, total_params,
      backend, and with measure_cer val_cer / val_cer_base (greedy CER on val_rows of the
      fine-tuned model and of the base: the same model with its adapter disabled), num_processes and
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

BACKENDS = ("auto", "unsloth", "transformers")


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
    logging_steps: int = _param(5, "log the train loss every N steps", minimum=1)
    report_to: str = _param("none", "extra transformers trackers, e.g. wandb (dvclive is always on)")
    num_processes: int = _param(1, "data-parallel training processes on this machine (torchrun; one GPU each); "
                                   "the same global batch, so the same loss curve", minimum=1)


# How the train stage runs, not what it trains: the search's Optuna trials run in one process, so the
# search does not read these (it trains with num_processes 1 and is not re-run when they change).
LAUNCH_KEYS = ("num_processes",)


TRAINING_FIELDS = {f.name: f for f in fields(TrainingConfig)}
TRAINING_KEYS = tuple(TRAINING_FIELDS)


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
    if not (config["finetune_attention_modules"] or config["finetune_mlp_modules"]):
        raise UserError("params.yaml: 'finetune_attention_modules' and 'finetune_mlp_modules' are both false (nothing to train)")
    return config


def split_train_val(rows, val_ratio, seed):
    """Shuffle documents (image folders) with `seed`; fill validation up to round(n * val_ratio) rows."""
    groups = defaultdict(list)
    for row in rows:
        groups[str(Path(row["image_path"]).parent)].append(row)
    if len(groups) < 2:  # a single folder: split lines instead of documents
        groups = {str(i): [row] for i, row in enumerate(rows)}
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
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


def ocr_examples(rows, instruction):
    """TRL conversational prompt/completion rows (stages/lib/prompt.py), images read by the one loader
    (stages/lib/images.py), so training sees the pixels evaluation sends."""
    from .images import load_image
    from .prompt import training_example

    return [training_example(load_image(r["image_path"]), r["ocr_text"], instruction) for r in rows]


def check_max_length(processor, dataset, max_length):
    """max_seq_length keeps the start of a sequence: refuse one that would cut the prompt (image tokens)."""
    if max_length is None:
        return
    row = dataset[0]
    text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
    prompt_len = processor(text=[text], images=[row["images"]], add_special_tokens=False)["input_ids"]
    if max_length <= len(prompt_len[0]):
        raise UserError(f"params.yaml: 'max_seq_length' {max_length} would cut the prompt of {len(prompt_len[0])} "
                        "tokens, image tokens included (raise it, or null for no limit)")


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
    prompt = prompt_length(base_dir, tokenizer, config["instruction"])
    answers = tokenizer([r["ocr_text"] for r in rows], add_special_tokens=False)["input_ids"]
    too_long = [(i, prompt + len(ids) + 1) for i, ids in enumerate(answers) if prompt + len(ids) + 1 > limit]
    if too_long:
        i, n = too_long[0]
        raise UserError(f"{len(too_long)} of {len(rows)} training/validation rows are longer than {what}, {limit} "
                        f"tokens (first: '{rows[i]['image_path']}', about {n} tokens, label "
                        f"{len(rows[i]['ocr_text'])} characters): split such pages into smaller images, raise "
                        "max_seq_length, or use a model with a longer context")


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

            def on_train_end(self, args, state, control, **kwargs):
                self.live.end()
        return _Live()


def import_unsloth_first(backend):
    """unsloth patches trl, transformers and peft when imported, so it must come before them: its
    SFTTrainer is the one that takes our plain list of conversations (trl's own refuses a list)."""
    if backend == "unsloth":
        import unsloth  # noqa: F401


def load_for_training(config, base_dir, backend):
    """(model with LoRA adapters, processor) for the chosen backend."""
    import torch

    from .modeling import load_model, load_processor

    from .families import family_of

    family = family_of(base_dir)
    processor = load_processor(base_dir)
    if backend == "unsloth":
        from unsloth import FastVisionModel

        model, _ = FastVisionModel.from_pretrained(str(base_dir), load_in_4bit=config["load_in_4bit"],
                                                   use_gradient_checkpointing="unsloth")
        model = FastVisionModel.get_peft_model(
            model, r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
            finetune_vision_layers=config["finetune_vision_layers"],
            finetune_language_layers=config["finetune_language_layers"],
            finetune_attention_modules=config["finetune_attention_modules"],
            finetune_mlp_modules=config["finetune_mlp_modules"], bias="none", random_state=config["seed"])
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
    extra = {}
    if backend == "unsloth":  # what UnslothVisionDataCollator wants
        extra = {"remove_unused_columns": False, "dataset_text_field": "", "dataset_kwargs": {"skip_prepare_dataset": True}}
    # Data-parallel: each process takes its share of the batch, so the global batch (and the optimizer
    # steps, the schedule and the loss curve) stay those of one process. Every rank gets the same seeds:
    # the same LoRA init and the same shuffled order, of which accelerate hands each rank its slice.
    per_process = config["per_device_train_batch_size"] // config["num_processes"]
    return SFTConfig(
        output_dir=str(checkpoint_dir), seed=config["seed"], data_seed=config["seed"],
        learning_rate=config["learning_rate"], num_train_epochs=config["num_train_epochs"],
        per_device_train_batch_size=per_process, per_device_eval_batch_size=per_process,
        gradient_accumulation_steps=config["gradient_accumulation_steps"],
        warmup_steps=config["warmup_ratio"], weight_decay=config["weight_decay"], lr_scheduler_type="cosine",
        max_grad_norm=1.0, logging_steps=config["logging_steps"], eval_strategy="steps",
        eval_steps=config["eval_steps"], save_strategy="steps", save_steps=config["eval_steps"], save_total_limit=2,
        load_best_model_at_end=True, metric_for_best_model="eval_loss", greater_is_better=False,
        max_length=config["max_seq_length"], completion_only_loss=True, bf16=bf16,
        gradient_checkpointing=cuda and backend != "unsloth", dataloader_pin_memory=cuda, use_cpu=not cuda,
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
    from transformers.trainer_utils import get_last_checkpoint
    from trl import SFTTrainer

    from .io import atomic_dir, read_json
    from .metrics import corpus_cer
    from .modeling import generation_budget, read_images

    checkpoint_dir = Path(checkpoint_dir or f"{output_dir}.checkpoints")
    last = get_last_checkpoint(str(checkpoint_dir)) if resume and checkpoint_dir.is_dir() else None
    args = sft_config(config, checkpoint_dir, backend)
    main = args.process_index == 0
    # main_process_first starts the process group (gloo on CPUs, NCCL on GPUs) and holds the other
    # ranks until rank 0 has set up the shared checkpoint folder.
    with args.main_process_first(local=False, desc="checkpoint folder"):
        if main:
            if resume and last is None:
                print(f"note: no checkpoint in {checkpoint_dir}: starting from the beginning")
            if not last and checkpoint_dir.exists():
                shutil.rmtree(checkpoint_dir)
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            (checkpoint_dir / ".gitignore").write_text("*\n")  # never committed; deleted after a finished run

    check_row_lengths(base_dir, train_rows + val_rows, config)   # before the model is loaded
    torch.manual_seed(config["seed"])
    model, processor = load_for_training(config, base_dir, backend)
    train_set, val_set = ocr_examples(train_rows, config["instruction"]), ocr_examples(val_rows, config["instruction"])
    check_max_length(processor, val_set, config["max_seq_length"])
    images = [row["images"][0] for row in val_set]
    extra = {}
    if backend == "transformers":
        from datasets import Dataset

        train_set, val_set = Dataset.from_list(train_set), Dataset.from_list(val_set)
    else:  # unsloth's notebooks: plain lists of `messages` rows and its own collator
        from unsloth.trainer import UnslothVisionDataCollator

        train_set, val_set = [to_messages(r) for r in train_set], [to_messages(r) for r in val_set]
        extra["data_collator"] = UnslothVisionDataCollator(
            model, processor, train_on_responses_only=True,
            instruction_part="<start_of_turn>user\n", response_part="<start_of_turn>model\n")
    live = [LiveCallback(live_dir, resume=bool(last))] if live_dir and main else []
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_set,
                         eval_dataset=val_set, processing_class=processor, callbacks=list(callbacks) + live, **extra)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    start = time.time()
    result = trainer.train(resume_from_checkpoint=last)
    runtime = time.time() - start
    # The evaluation below (the best checkpoint) is not a training step: no curve point, no report.
    for callback in [*callbacks, *live]:
        trainer.remove_callback(callback)
    final_eval = trainer.evaluate()  # the best checkpoint, reloaded by load_best_model_at_end (every rank)
    if not main:  # the checkpoints (saved by rank 0) are no longer read: the rest is rank 0's alone
        return None
    import torch.distributed as dist

    metrics = {
        "train_loss": result.training_loss, "eval_loss": final_eval["eval_loss"],
        "best_eval_loss": trainer.state.best_metric, "best_step": step_of(trainer.state.best_model_checkpoint),
        "global_step": trainer.state.global_step, "runtime_s": round(runtime, 2),
        "samples_per_second": result.metrics.get("train_samples_per_second"),
        "trainable_params": trainable, "total_params": total, "train_rows": len(train_rows),
        "val_rows": len(val_rows), "backend": backend, "load_in_4bit": config["load_in_4bit"],
        "num_processes": world, "distributed_backend": dist.get_backend() if dist.is_initialized() else None,
    }
    if measure_cer:
        if backend == "unsloth":
            from unsloth import FastVisionModel

            FastVisionModel.for_inference(model)
        refs = [r["ocr_text"] for r in val_rows]
        # the evaluation's rule (evaluate.max_tokens 'auto'): room for the longest label, so nothing is cut
        budget, _ = generation_budget(processor.tokenizer, [r["ocr_text"] for r in train_rows + val_rows],
                                      base_dir, config["instruction"])
        def amp():  # bf16 training can leave bf16 trainable weights: generate under autocast too
            return torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=bool(trainer.args.bf16))
        cut, cut_base = {}, {}
        with amp():
            metrics["val_cer"] = corpus_cer(refs, read_images(model, processor, images, config["instruction"],
                                                              max_new_tokens=budget, stats=cut))
        with amp(), model.disable_adapter():
            metrics["val_cer_base"] = corpus_cer(refs, read_images(model, processor, images, config["instruction"],
                                                                   max_new_tokens=budget, stats=cut_base))
        metrics.update(val_max_new_tokens=budget, val_truncated=cut.get("truncated", 0),
                       val_truncated_base=cut_base.get("truncated", 0))
    with atomic_dir(output_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        saved = read_json(Path(tmp) / "adapter_config.json")   # what the artifact says, not what we asked for
        metrics.update(adapter_r=saved.get("r"), adapter_lora_alpha=saved.get("lora_alpha"))
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return metrics


def step_of(checkpoint_path):
    return int(str(checkpoint_path).rsplit("-", 1)[-1]) if checkpoint_path else None


def to_messages(row):
    """prompt/completion -> one `messages` conversation with the image inline (unsloth's collator)."""
    user = {"role": "user", "content": [dict(part, image=row["images"][0]) if part["type"] == "image" else part
                                        for part in row["prompt"][0]["content"]]}
    return {"messages": [user, row["completion"][0]]}
