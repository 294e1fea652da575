"""base: the model that training starts from -> models/base/ (+ metrics/base.json).

model_name "tiny" (the default, no hub needed): build a small model of the family `base.family`
(gemma3, the default: stages/lib/tinymodel.py; gemma4, qwen3_vl: their modules in
stages/lib/families/, with their real resolution settings) from params `base` and pre-train it
fully on `base.pretrain_lines` separate synthetic lines in the sans fonts of `base.fonts`. Its
character tokenizer covers synthetic.charset() plus every character of the non-test split. White
paper enters the model as 0 whatever the family's own image scaling: with white as 1 the tiny
Qwen3-VL learned the text but not to read (held-out CER 1.04 after 400 steps; 0.51 with white 0). The dataset is serif: fine-tuning then
adapts the base to a new domain, as with a real pretrained checkpoint.
Pre-training text: synthetic.random_line (receipt-like lines, other random draws than the
dataset's). Measured (1,000 steps, 2 busy cores): CER 0.018 on held-out sans lines, 0.24 on the
serif dataset: the domain shift that fine-tuning removes. Random-character lines
(uniform draws from the alphabet, half the mix; that generator is gone) learned slower: CER 0.32
sans / 0.55 serif.

model_name = a local checkpoint folder (e.g. a downloaded gemma-3-4b-it, gemma-4-E4B-it,
Qwen3-VL-8B-Instruct): checked to be a model folder of a supported family (stages/lib/families/,
from its config.json model_type) and recorded in models/base/source.json, with its family and
resolution settings in metrics/base.json; nothing is built or downloaded.
"""
import argparse
import random
import sys
from collections import Counter

from .lib import params as P
from .lib.cli import UserError, record_runtime, run_main
from .lib.families import FAMILIES, family_of, resolution_settings
from .lib.io import atomic_dir, atomic_write_json, read_split
from .lib.metrics import corpus_cer
from .lib.modeling import SOURCE_FILE, check_model_dir, load_model, load_processor, read_images

OUT_DIR = "models/base"
METRICS = "metrics/base.json"
NON_TEST = "data/input/ocr_non_test.json"
PARAMS = ["model_name", "instruction", "base"]


def read_params(params):
    cfg = {"model_name": P.get(params, "model_name", str), "instruction": P.get(params, "instruction", str)}
    if cfg["model_name"] != "tiny":
        return cfg
    cfg["family"] = P.get(params, "base.family", str, choices=sorted(FAMILIES))
    for key in ("seed", "image_size", "text_hidden_size", "text_layers", "vision_hidden_size", "vision_layers",
                "pretrain_lines", "pretrain_steps", "pretrain_batch_size"):
        cfg[key] = P.get(params, f"base.{key}", int, minimum=0 if key == "seed" else 1)
    cfg["pretrain_learning_rate"] = P.get(params, "base.pretrain_learning_rate", float, minimum=0.0)
    cfg["fonts"] = P.get(params, "base.fonts", list)
    cfg["font_sizes"] = P.get(params, "base.font_sizes", list)
    if cfg["image_size"] % 128:
        raise UserError(f"params.yaml: 'base.image_size' must be a multiple of 128 (4x4 cells of 32 px), got {cfg['image_size']}")
    if cfg["text_hidden_size"] % 32 or cfg["vision_hidden_size"] % 32:
        raise UserError("params.yaml: 'base.text_hidden_size' and 'base.vision_hidden_size' must be multiples of 32")
    if cfg["pretrain_batch_size"] > cfg["pretrain_lines"] - held_out_count(cfg):
        raise UserError(f"params.yaml: 'base.pretrain_batch_size' is larger than the {cfg['pretrain_lines']} "
                        f"'base.pretrain_lines' minus the {held_out_count(cfg)} held out for the base's CER")
    if not cfg["fonts"] or not cfg["font_sizes"] or not all(isinstance(s, int) and s > 0 for s in cfg["font_sizes"]):
        raise UserError("params.yaml: 'base.fonts' and 'base.font_sizes' must be non-empty lists (sizes: positive ints)")
    return cfg


def held_out_count(cfg):
    """Pre-training lines kept aside to measure the base's CER: 100, or a fifth of small sets."""
    return min(100, cfg["pretrain_lines"] // 5)


def warn_if_not_grid(rows, image_size):
    """The tiny base reads square images of 4x4 character cells (the synthetic data); say so, in one
    line, when the data is something else (real scans, pages, lines of another shape)."""
    from .lib.images import ImageError, open_frame

    sizes = Counter()
    for row in rows[:200]:   # a sample is enough to tell
        try:
            frame = open_frame(row["image_path"])
        except ImageError:
            continue
        sizes[frame.size] += 1
        frame.close()
    other = [size for size in sizes if size != (image_size, image_size)]
    if other:
        w, h = max(other, key=sizes.__getitem__)
        print(f"warning: the tiny demo base reads {image_size}x{image_size} images of 4x4 character cells (the "
              f"synthetic data); {sum(sizes[s] for s in other)} of {sum(sizes.values())} sampled images are not "
              f"(e.g. {w}x{h}): its answers on them mean nothing. Set model_name to a real checkpoint folder "
              "(README: On a GPU with a real checkpoint)", file=sys.stderr)


def render_pretraining_lines(cfg):
    """(image, text) pairs in the base fonts, one character per cell."""
    from tqdm import tqdm

    from .lib.synthetic import load_font, random_line, render_line

    for font in cfg["fonts"]:
        load_font(font, cfg["font_sizes"][0])  # a missing font fails here, in one line
    rng = random.Random(f"base-{cfg['seed']}")
    samples = []
    for _ in tqdm(range(cfg["pretrain_lines"]), desc="rendering pre-training lines", unit="line"):
        text = random_line(rng)
        image = render_line(text, rng.choice(cfg["fonts"]), rng.choice(cfg["font_sizes"]), cfg["image_size"], rng)
        samples.append((image, text))
    return samples


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--non-test", default=NON_TEST, help="split file whose characters join the tokenizer")
    parser.add_argument("--output", default=OUT_DIR)
    parser.add_argument("--metrics", default=METRICS)
    args = parser.parse_args(argv)
    cfg = read_params(P.load_params(PARAMS))

    if cfg["model_name"] != "tiny":
        path = check_model_dir(cfg["model_name"])
        family = family_of(path)   # from its config.json model_type: an unsupported one stops here
        settings = resolution_settings(path)
        with atomic_dir(args.output, inputs=[path]) as tmp:
            atomic_write_json(tmp / SOURCE_FILE, {"model_name": str(path.resolve())})
        atomic_write_json(args.metrics, {"model_name": str(path.resolve()), "built": False,
                                         "family": family.MODEL_TYPE, "resolution": settings})
        print(f"base: using {path} ({family.TITLE}; {', '.join(f'{k} {v}' for k, v in settings.items())})")
        return

    from .lib.synthetic import charset
    from .lib.tinymodel import pretrain

    rows = read_split(args.non_test)
    warn_if_not_grid(rows, cfg["image_size"])
    alphabet = sorted(set(charset()) | {ch for row in rows for ch in row["ocr_text"]})
    samples = render_pretraining_lines(cfg)
    n_held = held_out_count(cfg)
    held_out, samples = samples[:n_held], samples[n_held:]
    family = FAMILIES[cfg["family"]]
    sizes = {k: cfg[k] for k in ("seed", "image_size", "text_hidden_size", "text_layers",
                                 "vision_hidden_size", "vision_layers")}
    with atomic_dir(args.output, inputs=[args.non_test]) as tmp:
        family.build_tiny(tmp, alphabet, white_is_zero=True, **sizes)   # white paper in as 0: it learns to read
        stats = pretrain(tmp, samples, cfg["instruction"], steps=cfg["pretrain_steps"],
                         learning_rate=cfg["pretrain_learning_rate"], batch_size=cfg["pretrain_batch_size"],
                         seed=cfg["seed"])
        model, processor = load_model(tmp), load_processor(tmp)
        predictions = read_images(model, processor, [image for image, _ in held_out], cfg["instruction"])
        stats["pretrain_held_out_cer"] = corpus_cer([text for _, text in held_out], predictions)
    stats.update(family=family.MODEL_TYPE, vocab_size=len(processor.tokenizer),
                 parameters=sum(p.numel() for p in model.parameters()))
    seconds = stats.pop("pretrain_runtime_s")
    record_runtime(pretrain_s=seconds)   # machine-varying: metrics/runtime/base.json, not metrics/base.json
    atomic_write_json(args.metrics, stats)
    print(f"base: tiny {family.TITLE} ({stats['parameters']:,} parameters) pre-trained {cfg['pretrain_steps']} steps "
          f"in {seconds} s; CER (raw text) on {n_held} held-out sans lines {stats['pretrain_held_out_cer']:.4f}")


if __name__ == "__main__":
    run_main(main)
