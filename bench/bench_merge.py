"""Merge memory: peak resident memory of the merge stage against the 16-bit model size.

    python -m bench.bench_merge [--text-hidden 1024] [--text-layers 16] [--samples 2] [--keep]

Generates (untimed) a Gemma 3 of a few hundred MB with stages.lib.tinymodel at bigger sizes,
saved in bf16 like real checkpoints (in 200 MB shards), and a LoRA adapter made the way
training makes it (every Linear of both towers, the projector via modules_to_save, small
random non-zero B). Then runs `stages.merge.main` in a child process that first imports
torch/transformers/peft and records its resident memory (the runtime's fixed cost), and
reports at the end its peak (VmHWM). Prints
  model      the merged bf16 weights' size
  increment  peak - resident memory after imports: what merging costs; target <= 1.5 x model
  total      peak of the whole process (includes ~0.4 GB of Python/torch/transformers)
and the stage's parity figures. Target: increment / model <= 1.5.
"""
import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def status_mb(field):
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args_json):
    """Runs in the measured process: imports, baseline, the stage, peak."""
    import peft  # noqa: F401  (the stage's own imports, paid before the baseline)
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: F401

    from stages import merge

    baseline = status_mb("VmRSS")
    start = time.time()
    merge.main(json.loads(args_json))
    print(json.dumps({"baseline_mb": baseline, "peak_mb": status_mb("VmHWM"), "seconds": time.time() - start}))


def build(folder, text_hidden, text_layers, vision_hidden, vision_layers):
    """A bf16 base (sharded) + a training-like LoRA adapter with processor files."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from stages.lib.synthetic import charset
    from stages.lib.tinymodel import build_tiny_model
    from stages.lib.families import gemma3
    from stages.lib.training import lora_targets

    fp32, base, lora = folder / "fp32", folder / "base", folder / "lora"
    build_tiny_model(fp32, charset(), text_hidden_size=text_hidden, text_layers=text_layers,
                     vision_hidden_size=vision_hidden, vision_layers=vision_layers)
    model = AutoModelForImageTextToText.from_pretrained(str(fp32), dtype=torch.bfloat16)
    model.save_pretrained(str(base), max_shard_size="200MB")
    processor = AutoProcessor.from_pretrained(str(fp32))
    processor.save_pretrained(str(base))
    flags = {f"finetune_{k}": True for k in ("vision_layers", "language_layers", "attention_modules", "mlp_modules")}
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=lora_targets(model, flags, gemma3),
                                                  modules_to_save=["multi_modal_projector"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # B starts at zero: give it a trained-like small value so merging changes weights
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02)
    peft_model.save_pretrained(str(lora))
    processor.save_pretrained(str(lora))
    shutil.rmtree(fp32)
    return base, lora


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text-hidden", type=int, default=1024)
    ap.add_argument("--text-layers", type=int, default=16)
    ap.add_argument("--vision-hidden", type=int, default=768)
    ap.add_argument("--vision-layers", type=int, default=4)
    ap.add_argument("--samples", type=int, default=2, help="parity images")
    ap.add_argument("--keep", action="store_true", help="keep the generated folders (path printed)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args.child)

    tmp = Path(tempfile.mkdtemp(prefix="bench_merge."))
    try:
        t = time.time()
        base, lora = build(tmp, args.text_hidden, args.text_layers, args.vision_hidden, args.vision_layers)
        print(f"bench_merge: generated base + adapter in {time.time() - t:.0f} s ({tmp})")
        metrics = tmp / "merge.json"
        stage_args = ["--base", str(base), "--adapter", str(lora), "--out", str(tmp / "merged"),
                      "--metrics", str(metrics), "--rows", str(tmp / "no-split.json"),
                      "--samples", str(args.samples), "--max-new-tokens", "8"]
        proc = subprocess.run([sys.executable, "-m", "bench.bench_merge", "--child", json.dumps(stage_args)],
                              cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"bench_merge: the merge failed:\n{proc.stderr[-2000:]}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        m = json.loads(metrics.read_text())
        model_mb = m["merged_size_bytes"] / 2**20
        increment = run["peak_mb"] - run["baseline_mb"]
        ratio = increment / model_mb
        print(f"bench_merge: model {model_mb:.0f} MiB bf16; peak RSS {run['peak_mb']:.0f} MiB, after imports "
              f"{run['baseline_mb']:.0f} MiB; increment {increment:.0f} MiB = {ratio:.2f} x model "
              f"(target <= 1.5: {'met' if ratio <= 1.5 else 'MISSED'}); "
              f"whole process {run['peak_mb'] / model_mb:.2f} x; stage {run['seconds']:.0f} s")
        print(f"bench_merge: parity {'passed' if m['passed'] else 'FAILED'}: greedy mismatches {m['greedy_mismatches']}"
              f"/{m['samples']}, logit gap {m['max_relative_logit_gap']:.3g} (tolerance {m['tolerance']:g}), "
              f"adapter effect {m['adapter_effect']:.3g}, vision LoRA effect {m['vision_lora_effect']:.3g}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
