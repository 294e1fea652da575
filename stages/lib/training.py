"""LoRA supervised fine-tuning of a Gemma 3 VLM on OCR rows: used by the train and search stages.

Contract (signatures are stable):
  training_config(params, overrides=None) -> dict
      The validated top-level training keys of params.yaml (TRAINING_KEYS), with `overrides`
      (e.g. a search trial's values) applied on top. A bad or unknown key raises UserError
      naming it, before anything heavy happens.
  split_train_val(rows, val_ratio, seed) -> (train_rows, val_rows)
      Seeded split of the non-test rows; whole documents (image folders) go to one side.
  run_training(config, base_dir, train_rows, val_rows, output_dir, *, callbacks=(),
               live_dir=None, resume=False, checkpoint_dir=None) -> dict
      Trains LoRA adapters (TRL SFTTrainer; unsloth on CUDA when chosen), evaluating eval_loss
      every `eval_steps` optimizer steps, and saves the BEST adapter + processor files to
      output_dir. `callbacks` are transformers.TrainerCallback objects (the search reports
      eval_loss to Optuna from on_evaluate and may raise optuna.TrialPruned: exceptions
      propagate). `live_dir`: dvclive folder for per-step train loss / per-eval eval_loss.
      `resume`: continue from the last checkpoint in checkpoint_dir (default
      output_dir + ".checkpoints"). Returns the final metrics: train_loss, eval_loss,
      best_eval_loss, best_step, global_step, runtime_s, samples_per_second,
      trainable_params, total_params, backend.
"""
import random
from collections import defaultdict
from pathlib import Path

from . import params as P
from .cli import UserError

BACKENDS = ("auto", "unsloth", "transformers")
# key -> (type, lookup options); all are top-level keys of params.yaml.
TRAINING_KEYS = {
    "model_name": (str, {}),
    "instruction": (str, {}),
    "backend": (str, {"choices": BACKENDS}),
    "seed": (int, {"minimum": 0}),
    "val_ratio": (float, {"minimum": 0.0, "maximum": 0.9}),
    "lora_r": (int, {"minimum": 1}),
    "lora_alpha": (float, {"minimum": 1.0e-9}),
    "lora_dropout": (float, {"minimum": 0.0, "maximum": 0.99}),
    "learning_rate": (float, {"minimum": 1.0e-12}),
    "num_train_epochs": (float, {"minimum": 1.0e-9}),
    "per_device_train_batch_size": (int, {"minimum": 1}),
    "gradient_accumulation_steps": (int, {"minimum": 1}),
    "warmup_ratio": (float, {"minimum": 0.0, "maximum": 1.0}),
    "weight_decay": (float, {"minimum": 0.0}),
    "max_seq_length": (int, {"minimum": 1, "allow_none": True}),
    "load_in_4bit": (bool, {}),
    "finetune_vision_layers": (bool, {}),
    "finetune_language_layers": (bool, {}),
    "finetune_attention_modules": (bool, {}),
    "finetune_mlp_modules": (bool, {}),
    "eval_steps": (int, {"minimum": 1}),
    "logging_steps": (int, {"minimum": 1}),
    "report_to": (str, {}),
}


def training_config(params, overrides=None):
    """Validated training keys from params (top level), `overrides` applied first."""
    merged = {key: params.get(key) for key in TRAINING_KEYS if key in params}
    for key, value in (overrides or {}).items():
        if key not in TRAINING_KEYS:
            raise UserError(f"params.yaml: unknown training parameter '{key}' (known: {', '.join(TRAINING_KEYS)})")
        merged[key] = value
    config = {}
    for key, (kind, options) in TRAINING_KEYS.items():
        config[key] = P.get(merged, key, kind, **options)
    if not config["instruction"].strip():
        raise UserError("params.yaml: 'instruction' must not be empty")
    if not (config["finetune_vision_layers"] or config["finetune_language_layers"]):
        raise UserError("params.yaml: 'finetune_vision_layers' and 'finetune_language_layers' are both false (nothing to train)")
    if not (config["finetune_attention_modules"] or config["finetune_mlp_modules"]):
        raise UserError("params.yaml: 'finetune_attention_modules' and 'finetune_mlp_modules' are both false (nothing to train)")
    if config["val_ratio"] <= 0:
        raise UserError("params.yaml: 'val_ratio' must be > 0 (validation picks the best checkpoint)")
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


def run_training(config, base_dir, train_rows, val_rows, output_dir, *, callbacks=(), live_dir=None,
                 resume=False, checkpoint_dir=None):
    raise NotImplementedError("being written (issue 4)")
