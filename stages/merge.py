"""merge: models/base + models/lora -> models/merged/ (one 16-bit model folder) + metrics/merge.json.

    python -m stages.merge [--base models/base] [--adapter models/lora] [--out models/merged]
                           [--dtype auto|bfloat16|float16|float32] [--samples 4] [--keep-free-gb 1]

vLLM serves one merged folder best, and merged Gemma 3 folders have failed in known ways; each
has a guard here:
- merged into 4-bit weights: the base is always loaded in 16-bit (bf16, or fp16 where a GPU
  lacks bf16), whatever `load_in_4bit` training used; a pre-quantized base is refused.
- vision LoRA left unmerged, or a merge that is wrong in any other way: the parity check. On a
  handful of validation images (data/input/ocr_non_test.json, the same validation split as
  training; rendered lines when the file is absent) the merged folder, reloaded from disk, must
  decode greedily exactly like base + adapter, with every step's logits within a tolerance
  (relative to the largest logit; per dtype, see stages/lib/merging.py TOLERANCE); a run may
  part only at a near tie (both tokens' reference logits within the tolerance: counted as
  greedy_near_ties). A failure
  fails the stage and leaves no models/merged/. metrics/merge.json also records how far the
  adapter, and the vision LoRA alone, move the logits on the same scale: when those are far
  above the tolerance, an unmerged adapter cannot pass unnoticed.
- wrong `architectures`, missing processor / chat template / generation config: written and
  checked by merging.finish_folder.
- a key layout vLLM's loader for the family refuses: the family module (stages/lib/families/,
  chosen by the base's config.json model_type) writes its real checkpoints' layout (Gemma 3:
  language_model.model.*, vision_tower.vision_model.*, no SigLIP head, vision_use_head false;
  Gemma 4, Qwen3-VL: what transformers saves), checks every tensor against vLLM 0.33.0's
  weight-name mapping for the family, and the folder is reloaded with no missing or unexpected keys.
- a disk check tied to one host path: free space is measured on the output's own filesystem,
  against the base's real size at the merge dtype, before anything is loaded.
Merging: unsloth's 16-bit merged save on CUDA with unsloth (params `backend`), peft's
merge_and_unload otherwise. Peak memory stays near one 16-bit copy (bench/bench_merge.py).
The folder loads with AutoModelForImageTextToText/AutoProcessor and `transformers serve`.
"""
import argparse
import random
import time
from pathlib import Path

from .lib import merging as M
from .lib import params as P
from .lib.cli import UserError, record_runtime, run_main
from .lib.families import family_image_settings, family_of
from .lib.io import atomic_dir, atomic_write_json, read_split
from .lib.modeling import IMAGE_PARAMS, free_memory, image_settings, load_processor, resolve_base_dir

SERIF = "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC"
PARAMS = ["instruction", "backend", "val_ratio", "seed", IMAGE_PARAMS]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="models/base", help="the base stage's folder (or a model folder)")
    ap.add_argument("--adapter", default="models/lora", help="peft LoRA adapter + processor files")
    ap.add_argument("--out", default="models/merged")
    ap.add_argument("--metrics", default="metrics/merge.json")
    ap.add_argument("--rows", default="data/input/ocr_non_test.json", help="parity images: its validation split")
    ap.add_argument("--samples", type=int, default=4, help="images in the parity check")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy steps compared per image")
    ap.add_argument("--dtype", choices=M.DTYPES, default="auto",
                    help="merge dtype: auto = bf16 (on GPUs without bf16: float32 for Gemma 3, which vLLM refuses in "
                         "float16); float32 also for exact checks")
    ap.add_argument("--tolerance", type=float, default=None, help="relative logit tolerance (default: per dtype)")
    ap.add_argument("--keep-free-gb", type=float, default=1.0, help="disk space to leave free after the merge")
    args = P.parse_checked(ap, argv)
    for name in ("samples", "max_new_tokens"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.keep_free_gb < 0 or (args.tolerance is not None and args.tolerance <= 0):
        raise UserError("--keep-free-gb must be >= 0 and --tolerance > 0")
    return args


def parity_images(rows_path, n, val_ratio, seed):
    """The first n validation images (training's own split), or n rendered lines without a split file."""
    from .lib.synthetic import random_line, render_line
    from .lib.images import load_image
    from .lib.training import split_train_val

    if not Path(rows_path).is_file():
        print(f"note: {rows_path} not found: the parity check uses {n} rendered lines")
        return [render_line(random_line(rng), SERIF, 24, 128, rng) for rng in (random.Random(i) for i in range(n))]
    rows = read_split(rows_path)
    if len(rows) >= 2:
        rows = split_train_val(rows, val_ratio, seed)[1]
    for row in rows[:n]:
        if not Path(row["image_path"]).is_file():
            raise UserError(f"{rows_path}: image '{row['image_path']}' does not exist")
    return [load_image(row["image_path"]) for row in rows[:n]]


def find_processor(adapter_dir, base_dir, image):
    """Training saves the processor (tokenizer, image processor, chat template) beside the adapter;
    params `image:` applied (the settings the parity check reads with and the merged folder records)."""
    for folder in (adapter_dir, base_dir):
        try:
            return load_processor(folder, image)
        except (OSError, ValueError, KeyError):
            continue
    raise UserError(f"{adapter_dir}: no processor files here nor in {base_dir} (tokenizer, image processor)")


def main(argv=None):
    args = parse_args(argv)
    params = P.load_params(PARAMS)
    instruction, backend = P.get(params, "instruction", str), P.get(params, "backend", str)
    val_ratio, seed = P.get(params, "val_ratio", float, minimum=0.0), P.get(params, "seed", int)
    image = image_settings(params)

    # Pre-flight, before anything heavy: inputs, then disk space.
    from .lib.training import choose_backend

    base_dir = resolve_base_dir(args.base)
    base_config = M.check_base(base_dir)
    family = family_of(base_dir)   # an unsupported model_type stops here, before anything heavy
    image = family_image_settings(family, image)   # this family's settings of params `image:`
    M.note_trained_base(M.read_adapter(args.adapter), base_dir)
    dtype_name, torch_dtype = M.pick_dtype(args.dtype, base_config.get("model_type"))
    tolerance = args.tolerance or M.TOLERANCE[dtype_name]
    size = M.merged_size_bytes(base_dir, torch_dtype.itemsize)
    M.check_free_space(args.out, size, args.keep_free_gb)
    backend = choose_backend({"backend": backend, "load_in_4bit": False})  # the base always loads in 16-bit here
    backend, note = M.merge_backend(backend, base_dir, dtype_name)
    if note:
        print(f"merge: {note}")
    images = parity_images(args.rows, args.samples, val_ratio, seed)
    processor = find_processor(args.adapter, base_dir, image)

    start = time.time()
    M.return_freed_memory()
    with atomic_dir(args.out, inputs=[base_dir, args.adapter, args.rows]) as tmp:
        # 1. Reference: base + adapter, unmerged, in the merge dtype.
        peft_model, reference, figures = M.reference_runs(
            base_dir, args.adapter, torch_dtype, processor, images, instruction, args.max_new_tokens)
        # 2. Merge and save (one copy of the model in memory at a time).
        if backend == "unsloth":
            del peft_model
            free_memory()
            M.merge_with_unsloth(base_dir, args.adapter, tmp, torch_dtype, processor)
        else:
            M.merge_with_peft(peft_model, tmp)
            del peft_model
            free_memory()
        layout = family.write_layout(tmp)
        files = M.finish_folder(tmp, base_config, processor, family)
        saved_dtype = M.check_saved_dtype(tmp, dtype_name)
        problems = family.layout_problems(tmp)   # the layout vLLM's loader for the family reads
        if problems:
            raise UserError(f"{args.out}: not in the layout vLLM loads: {'; '.join(problems)}")
        # 3. Parity: the folder as a server will load it, processor included, with no missing or extra keys.
        merged = M.load_base(tmp, torch_dtype, strict=True)
        runs = M.greedy_with_logits(merged, load_processor(tmp, image), images, instruction,
                                    args.max_new_tokens, family.STOP_TOKENS)
        architectures = merged.config.architectures
        del merged
        free_memory()
        passed, mismatches, near_ties, gap = M.judge(reference, runs, tolerance)
        metrics = {
            "passed": passed, "backend": backend, "dtype": dtype_name, "saved_dtype": saved_dtype,
            "architectures": architectures, "family": family.MODEL_TYPE, "layout": layout, "image": image,
            "samples": len(images), "max_new_tokens": args.max_new_tokens,
            "greedy_mismatches": mismatches, "greedy_near_ties": near_ties, "max_relative_logit_gap": gap, "tolerance": tolerance,
            **figures, "merged_size_bytes": size, "files": files,
        }
        # machine-varying: metrics/runtime/merge.json, not metrics/merge.json
        record_runtime(merge_s=round(time.time() - start, 1))
        atomic_write_json(args.metrics, metrics)
        if not passed:
            raise UserError(f"parity check failed: {mismatches}/{len(images)} greedy outputs differ, logit gap "
                            f"{gap:.3g} (tolerance {tolerance:g}); models/merged not written (see {args.metrics})")
    ties = f" ({near_ties} parted at a near tie)" if near_ties else ""
    print(f"merged -> {args.out} ({dtype_name}, {size / 2**20:.1f} MiB): greedy identical on {len(images)} images{ties}, "
          f"logit gap {gap:.3g} <= {tolerance:g}; adapter effect {figures['adapter_effect']:.3g}, "
          f"vision LoRA {figures['vision_lora_effect']:.3g}")


if __name__ == "__main__":
    run_main(main)
