"""train: LoRA fine-tuning of models/base on the non-test split -> models/lora/ metrics/train.json plots/train/

1. Hyperparameters: the top-level training keys of params.yaml (stages/lib/training.py
   TrainingConfig), and nothing else: `dvc exp run -S lora_r=8` trains with r 8. The search
   never replaces a value behind your back; `python -m stages.search --apply-best` writes its
   best values into params.yaml, where `dvc params diff` shows them and git records them.
2. The non-test rows are split into train/validation (val_ratio, seed; whole documents).
3. TRL SFTTrainer, loss on the answer only, LoRA on the linear layers the finetune_* flags
   pick (the projector trained fully); unsloth on CUDA when installed (`backend`).
   eval_loss every eval_steps; the best checkpoint is kept. dvclive writes plots/train/.
4. models/lora/: the best adapter + processor files. metrics/train.json: final figures, with the
   greedy-decoding CER on the validation lines of the fine-tuned model and of the base, and
   `trained_with`: every hyperparameter value this adapter was trained with.

--resume continues an interrupted run from its last checkpoint in models/checkpoints/train/
(kept outside the DVC out, git-ignored, deleted after a finished run; one every eval_steps):
    python -m stages.train --resume && dvc commit train
--report-to wandb adds a tracker for transformers (dvclive is always on).
"""
import argparse

from .lib import params as P
from .lib.cli import run_main
from .lib.io import atomic_write_json, read_split
from .lib.modeling import resolve_base_dir
from .lib.training import TRAINING_KEYS, choose_backend, run_training, split_train_val, training_config

NON_TEST = "data/input/ocr_non_test.json"
OUT_DIR = "models/lora"
CHECKPOINTS = "models/checkpoints/train"
LIVE_DIR = "plots/train"
METRICS = "metrics/train.json"
PARAMS = list(TRAINING_KEYS)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    parser.add_argument("--report-to", help="extra transformers trackers, e.g. wandb (default: params report_to)")
    parser.add_argument("--non-test", default=NON_TEST)
    parser.add_argument("--base-dir", default="models/base")
    parser.add_argument("--output", default=OUT_DIR)
    parser.add_argument("--checkpoints", default=CHECKPOINTS)
    parser.add_argument("--live-dir", default=LIVE_DIR)
    parser.add_argument("--metrics", default=METRICS)
    args = parser.parse_args(argv)

    params = P.load_params(PARAMS)
    config = training_config(params, {"report_to": args.report_to} if args.report_to else None)
    backend = choose_backend(config)  # refuses unsloth without CUDA, 4-bit on the CPU
    base_dir = resolve_base_dir(args.base_dir)
    train_rows, val_rows = split_train_val(read_split(args.non_test), config["val_ratio"], config["seed"])
    print(f"train: {len(train_rows)} training / {len(val_rows)} validation rows; base {base_dir}; "
          f"backend {backend}; lora_r {config['lora_r']}, learning_rate {config['learning_rate']:g}")

    metrics = run_training(config, base_dir, train_rows, val_rows, args.output, live_dir=args.live_dir,
                           resume=args.resume, checkpoint_dir=args.checkpoints)
    metrics["trained_with"] = config
    atomic_write_json(args.metrics, metrics)
    print(f"train: eval_loss {metrics['eval_loss']:.4f}, validation CER {metrics['val_cer']:.4f} "
          f"(base {metrics['val_cer_base']:.4f}), {metrics['runtime_s']} s -> {args.output}")


if __name__ == "__main__":
    run_main(main)
