"""train: LoRA fine-tuning of models/base on the non-test split -> models/lora/ metrics/train.json plots/train/

1. Hyperparameters: the top-level training keys of params.yaml (stages/lib/training.py
   TrainingConfig), and nothing else: `dvc exp run -S lora_r=8` trains with r 8. The search
   never replaces a value behind your back; `python -m stages.search --apply-best` writes its
   best values into params.yaml, where `dvc params diff` shows them and git records them.
2. The non-test rows are split into train/validation (val_ratio, seed; whole documents).
3. TRL SFTTrainer with the project's own batches (training.OcrCollator: the image loader, the
   prompt, params `image:`, loss on the answer only), LoRA on the linear layers the finetune_* flags
   pick (the projector trained fully); unsloth's model on CUDA when installed (`backend`), the same
   batches and modules.
   eval_loss every eval_steps; the best checkpoint is kept. dvclive writes plots/train/.
4. models/lora/: the best adapter + processor files. metrics/train.json: final figures, with the
   greedy-decoding CER on the validation lines of the fine-tuned model and of the base, and
   `trained_with`: every hyperparameter value this adapter was trained with.

--resume continues an interrupted run from its last checkpoint in models/checkpoints/train/
(kept outside the DVC out, git-ignored, deleted after a finished run; one every eval_steps):
    python -m stages.train --resume && dvc commit train
--report-to wandb adds a tracker for transformers (dvclive is always on).

num_processes > 1: data-parallel training. This command re-launches itself as that many torchrun
workers (stages/lib/launch.py; gloo on CPUs, NCCL on GPUs, one GPU each), each taking
per_device_train_batch_size / num_processes rows of every batch: the same global batch as one
process. Only rank 0 writes the outputs and prints the summary; the workers' stderr is in
models/checkpoints/train.log while they run (kept when one fails, named in the one-line error).
"""
import argparse
import sys

from .lib import params as P
from .lib import launch
from .lib.cli import UserError, run_main
from .lib.io import atomic_write_json, read_split
from .lib.modeling import resolve_base_dir
from .lib.training import TRAINING_PARAMS, choose_backend, demo_value_warnings, run_training, split_train_val, training_config

NON_TEST = "data/input/ocr_non_test.json"
OUT_DIR = "models/lora"
CHECKPOINTS = "models/checkpoints/train"
LIVE_DIR = "plots/train"
METRICS = "metrics/train.json"
PARAMS = list(TRAINING_PARAMS)


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
    if not launch.is_worker():
        for warning in demo_value_warnings(config):
            print(warning, file=sys.stderr)
    base_dir = resolve_base_dir(args.base_dir)
    train_rows, val_rows = split_train_val(read_split(args.non_test), config["val_ratio"], config["seed"])
    n, worker = config["num_processes"], launch.is_worker()
    if not worker:
        print(f"train: {len(train_rows)} training / {len(val_rows)} validation rows; base {base_dir}; "
              f"backend {backend}; lora_r {config['lora_r']}, learning_rate {config['learning_rate']:g}")
    if n > 1 and not worker:  # start n copies of this command under torchrun; they do the training
        check_devices(n)
        log = f"{args.checkpoints}.log"
        print(f"train: {n} processes (torchrun), {config['per_device_train_batch_size'] // n} rows of each batch "
              f"of {config['per_device_train_batch_size']} per process; workers' output: {log}", flush=True)
        launch.launch(n, "stages.train", sys.argv[1:] if argv is None else list(argv), log)
        return  # rank 0 wrote the outputs and printed the summary

    metrics = run_training(config, base_dir, train_rows, val_rows, args.output, live_dir=args.live_dir,
                           resume=args.resume, checkpoint_dir=args.checkpoints)
    if metrics is None:  # a torchrun worker other than rank 0: it writes nothing
        return
    metrics["trained_with"] = config
    atomic_write_json(args.metrics, metrics)
    if metrics["cut_rows"]:
        print(f"warning: {metrics['cut_rows']} training/validation rows were longer than max_seq_length "
              f"{config['max_seq_length']} and trained on their start only (metrics cut_rows)", file=sys.stderr)
    print(f"train: eval_loss {metrics['eval_loss']:.4f}, validation CER {metrics['val_cer']:.4f} "
          f"(base {metrics['val_cer_base']:.4f}), {metrics['runtime_s']} s -> {args.output}")


def check_devices(n):
    """One GPU per process: refuse more processes than visible GPUs (CPUs: any number runs, gloo)."""
    import torch

    if torch.cuda.is_available() and n > torch.cuda.device_count():
        raise UserError(f"params.yaml: 'num_processes' {n} is more than the {torch.cuda.device_count()} visible GPUs")


if __name__ == "__main__":
    run_main(main)
