"""What the two training backends make of the same rows: run by tools/gpu_check.sh on a GPU.

    python tools/compare_backends.py fixture DIR
        builds DIR/base (a tiny Gemma 3 in the real shape: 896 px, 14 px patches, 256 image tokens)
        and DIR/rows.json (8 rendered pages of 1344x896 px: pan-and-scan gives each 2 crops)
    python tools/compare_backends.py one BACKEND BITS BASE ROWS OUT.json [--image JSON]
        loads BASE for training with BACKEND (transformers | unsloth) at BITS (16 | 4) exactly as the
        train stage does (stages/lib/training.py load_for_training + OcrCollator), collates the first
        4 rows and writes: per-row sequence lengths, prompt lengths, image tokens, a SHA-256 of the
        pixel tensor and of the labels, the trainable modules and parameter counts, one forward loss
    python tools/compare_backends.py compare A.json B.json ...
        exits 1, naming the field, when the runs differ in anything but the loss (reported)

Each `one` runs in its own process: unsloth patches transformers/peft/trl when imported.
"""
import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAN_AND_SCAN = {"do_pan_and_scan": True, "pan_and_scan_max_num_crops": 4, "pan_and_scan_min_crop_size": 256,
                "pan_and_scan_min_ratio_to_activate": 1.2}
SAME = ("rows", "sequence_lengths", "prompt_lengths", "image_tokens", "pixel_sha256", "pixel_shape", "labels_sha256",
        "trainable_modules", "trainable_params", "image")


def fixture(folder):
    import random

    from PIL import Image

    from stages.lib.synthetic import charset, random_line, render_line
    from stages.lib.tinymodel import build_tiny_model

    folder = Path(folder)
    build_tiny_model(folder / "base", charset(), seed=0, text_hidden_size=64, text_layers=1,
                     vision_hidden_size=32, vision_layers=1, real_shape=True)
    rows = []
    for i in range(8):
        rng = random.Random(i)
        text = random_line(rng)[:6]
        page = Image.new("RGB", (1344, 896), "white")
        page.paste(render_line(text, "NotoSerifCJK-Regular.ttc:Noto Serif CJK TC", 24, 128, rng).resize((768, 768)),
                   (288, 64))
        path = folder / "pages" / f"doc{i % 4}" / f"page_{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        page.save(path)
        rows.append({"image_path": str(path), "ocr_text": text})
    (folder / "rows.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    print(f"fixture: {folder}/base (real-shaped tiny Gemma 3), {folder}/rows.json ({len(rows)} pages)")


def sha(tensor):
    return hashlib.sha256(tensor.detach().cpu().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def one(backend, bits, base, rows_path, out, image):
    from stages.lib.families import family_of
    from stages.lib.params import load_params
    from stages.lib.training import (OcrCollator, import_unsloth_first, load_for_training, trainable_modules,
                                     training_config)

    import_unsloth_first(backend)
    import torch

    params = load_params(path=ROOT / "params.yaml")
    params["image"] = image
    config = training_config(params, {"backend": backend, "load_in_4bit": bits == 4, "lora_r": 16,
                                      "lora_alpha": 16.0, "max_seq_length": 8192})
    rows = json.loads(Path(rows_path).read_text(encoding="utf-8"))[:4]
    torch.manual_seed(config["seed"])
    model, processor = load_for_training(config, base, backend)
    collator = OcrCollator(processor, config["instruction"], config["max_seq_length"])
    encoded = [collator.encode(row) for row in rows]
    batch = collator(rows)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    modules = trainable_modules(model, family_of(base))
    model.train()
    with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=torch.cuda.is_available()):
        loss = model(**{k: v.to(model.device) for k, v in batch.items()}).loss.item()
    result = {
        "backend": backend, "bits": bits, "image": image, "rows": [r["image_path"] for r in rows],
        "sequence_lengths": [len(e["input_ids"]) for e in encoded],
        "prompt_lengths": [e["prompt_length"] for e in encoded],
        "image_tokens": [int((e["input_ids"] == image_id).sum()) for e in encoded],
        "pixel_sha256": sha(batch["pixel_values"]), "pixel_shape": list(batch["pixel_values"].shape),
        "labels_sha256": sha(batch["labels"]), "trainable_modules": modules, "trainable_params": sum(modules.values()),
        "cut_rows": len(collator.cut_rows), "loss": loss,
    }
    Path(out).write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(json.dumps(result))


def compare(paths):
    runs = [json.loads(Path(p).read_text(encoding="utf-8")) for p in paths]
    first, failed = runs[0], 0
    for run in runs[1:]:
        for field in SAME:
            if run[field] != first[field]:
                failed += 1
                print(f"DIFFERENT {field}: {first['backend']} {first['bits']}-bit {first[field]} vs "
                      f"{run['backend']} {run['bits']}-bit {run[field]}")
    for run in runs:
        print(f"{run['backend']} {run['bits']}-bit: lengths {run['sequence_lengths']}, image tokens "
              f"{run['image_tokens']}, pixels {run['pixel_shape']} {run['pixel_sha256']}, trainable "
              f"{run['trainable_params']} {run['trainable_modules']}, loss {run['loss']:.4f}")
    print("compare: identical" if not failed else f"compare: {failed} differences")
    return 1 if failed else 0


def main(argv):
    if argv[:1] == ["fixture"] and len(argv) == 2:
        return fixture(argv[1])
    if argv[:1] == ["one"] and len(argv) in (6, 8):
        image = json.loads(argv[7]) if len(argv) == 8 and argv[6] == "--image" else PAN_AND_SCAN
        return one(argv[1], int(argv[2]), argv[3], argv[4], argv[5], image)
    if argv[:1] == ["compare"] and len(argv) >= 3:
        return compare(argv[1:])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]) or 0)
