"""Scoring speed: our scorer vs the original's way vs a bare rapidfuzz loop, whole process each.

    python -m bench.bench_score [--samples 200000] [--repeats 3]

Two cases, each an evaluation output of N (label, prediction) pairs generated untimed and seeded:
  receipt-like  labels of up to 40 characters: CJK, digits, Latin, ASCII and CJK punctuation,
                full-width forms, spaces, symbols
  marks         the same, but a third of the labels are Latin/Vietnamese-like lines with
                combining marks (decomposed accents, two marks on a letter, kana with a
                combining voicing mark: NFC has work to do), the prediction often precomposed
Predictions are noisy copies (exact, dropped/substituted/inserted characters, half/full-width
swaps, scrambled, empty) and 0.5% are failed requests. Per case, times as separate processes
started the same way, interleaved, best of --repeats:
  ours      python -m stages.score --input F --output G  (params.yaml: 1000 bootstrap resamples)
  original  the original count_score: regex normalization, jiwer.cer per sample, Counter F1,
            jiwer.cer over the whole list for the overall figure, json load/dump
  bare      read F (orjson), normalize with stages.lib.metrics, sum rapidfuzz Levenshtein
            distances over the same scored pairs, print the corpus CER (no F1, nothing written)
and prints, per case, original/ours (target >= 10) and ours/bare (target <= 2), for wall-clock
time and for CPU time (user + system of the child, steadier when other jobs share the machine).
"""
import argparse
import json
import random
import resource
import string
import subprocess
import sys
import tempfile
import time
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CJK = "的一是不了人我在有他這中大來上國個到說們為子和你地出道也時年得就那要下以生會自著去之後發行臺灣銀行收據金額"
HALF = string.digits + string.ascii_letters
FULL = "".join(chr(ord(c) + 0xFEE0) for c in HALF + "!?%()")
PUNCT = "，。！？「」、：；（）…—·" + ".,-:/()%$#"
POOL = CJK * 4 + HALF + FULL + PUNCT + "  ¥©→"
# The second case: text with combining marks (decomposed accents, Vietnamese with one or two
# marks, kana with a combining voicing mark, a mark that composes with nothing), and precomposed
# letters beside them. Each item is one visible letter; NFC composes all but the last two items.
MARKED = ["e\u0301", "a\u0300", "o\u0302", "u\u0308", "n\u0303", "c\u0327", "e\u0302\u0301",
          "o\u031b\u0323", "a\u0306\u0303", "u\u031b\u0300", "か\u3099", "ハ\u309a", "x\u0301", "a\u0316"]
PRECOMPOSED = "éàôüñçếợẵừđươ"
LATIN = string.ascii_lowercase * 2 + PRECOMPOSED + " " * 6 + string.digits + ".,-:"


# ---------------------------------------------------------------- data (not timed)

def noisy_copy(label, rng):
    """A prediction: mostly the label with a few character errors, sometimes worse."""
    roll = rng.random()
    if roll < 0.30:
        return label
    if roll < 0.31:
        return ""
    if roll < 0.32:
        return "".join(rng.sample(label, len(label)))
    out = []
    for ch in label:
        r = rng.random()
        if r < 0.04:
            continue
        if r < 0.08:
            out.append(rng.choice(POOL))
        elif r < 0.10:
            out.append(ch + rng.choice(POOL))
        elif r < 0.12 and ch in HALF:
            out.append(chr(ord(ch) + 0xFEE0))  # a full-width form of the same character
        else:
            out.append(ch)
    return "".join(out)


def marked_label(rng):
    """A Latin/Vietnamese-like line holding at least one combining mark (up to ~40 letters)."""
    items = [rng.choice(MARKED) if rng.random() < 0.15 else rng.choice(LATIN) for _ in range(rng.randint(0, 39))]
    items.insert(rng.randint(0, len(items)), rng.choice(MARKED))
    return "".join(items)


def make_evaluation(n, seed=0, marks=False):
    """N samples; with `marks`, about a third of the labels (and of the predictions, copied from
    them) carry combining marks, so that NFC has work to do."""
    rng = random.Random(seed)
    samples = []
    for i in range(n):
        # a CJK first character: the original's way crashes on a reference that normalizes to empty
        if marks and rng.random() < 1 / 3:
            label = rng.choice(CJK) + marked_label(rng)
            # an OCR model often writes the precomposed letter where the label has a mark
            prediction = noisy_copy(unicodedata.normalize("NFC", label) if rng.random() < 0.3 else label, rng)
        else:
            label = rng.choice(CJK) + "".join(rng.choice(POOL) for _ in range(rng.randint(0, 39)))
            prediction = noisy_copy(label, rng)
        sample = {"image_path": f"data/raw_data/images/{i // 10:05d}/line_{i:06d}.png", "label": label,
                  "prediction": prediction, "cer_score": 0.0, "f1_score": 0.0,
                  "latency_s": round(rng.uniform(0.05, 0.5), 4), "completion_tokens": len(label) + 1}
        if rng.random() < 0.005:
            sample.update(prediction=None, cer_score=None, f1_score=None, error="HTTP 503")
        samples.append(sample)
    return {"overall_cer": 0.0, "overall_f1": 0.0, "total_samples": n, "timestamp": "2026-01-01T00:00:00+00:00",
            "model_name": "bench", "samples": samples}


# ---------------------------------------------------------------- the three ways (child processes)

def original_way(input_path, output_path):
    """The original count_score, as the field notes describe it (its conventions, not ours)."""
    import re
    from collections import Counter

    import jiwer

    whitespace = re.compile(r"\s+")
    ascii_punct = re.compile("[" + re.escape(string.punctuation) + "]")
    cjk_punct = re.compile("[，。！？；：、「」『』（）《》〈〉【】…—～·]")

    def normalize(text):
        return cjk_punct.sub("", ascii_punct.sub("", whitespace.sub("", text)))

    with open(input_path, encoding="utf-8") as f:
        doc = json.load(f)
    refs, preds = [], []
    for sample in doc["samples"]:
        ref, pred = normalize(sample["label"]), normalize(sample["prediction"] or "")
        common = sum((Counter(ref) & Counter(pred)).values())
        sample["cer_score"] = jiwer.cer(ref, pred)
        sample["f1_score"] = 0.0 if common == 0 else 2 * common / (len(ref) + len(pred))
        refs.append(ref)
        preds.append(pred)
    doc["overall_cer"] = jiwer.cer(refs, preds)
    doc["overall_f1"] = sum(s["f1_score"] for s in doc["samples"]) / len(doc["samples"])
    with open(output_path, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)


def bare_way(input_path):
    """The floor: read, normalize, one rapidfuzz Levenshtein call per scored pair."""
    import orjson
    from rapidfuzz.distance import Levenshtein

    from stages.lib.metrics import normalize_many

    samples = [s for s in orjson.loads(Path(input_path).read_bytes())["samples"] if not s.get("error")]
    refs = normalize_many([s["label"] for s in samples])
    preds = normalize_many([s["prediction"] for s in samples])
    print(repr(sum(map(Levenshtein.distance, refs, preds)) / sum(map(len, refs))))


# ---------------------------------------------------------------- timing

def timed(cmd):
    """(wall seconds, CPU seconds, stdout) of one child process. CPU time (user + system) is
    the steadier figure on a machine that other jobs share; wall time is what a user waits."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"bench_score: {' '.join(cmd)} failed:\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


CASES = {"receipt-like": False, "marks": True}  # case name: make_evaluation's `marks`


def run_bench(n, repeats, marks=False):
    with tempfile.TemporaryDirectory(prefix="bench_score_") as tmp:
        data = Path(tmp) / "evaluation.json"
        data.write_text(json.dumps(make_evaluation(n, marks=marks), ensure_ascii=False, indent=2), encoding="utf-8")
        commands = {
            "ours": [sys.executable, "-m", "stages.score", "--input", str(data), "--output", f"{tmp}/ours.json"],
            "original": [sys.executable, "-m", "bench.bench_score", "--child", "original", str(data), f"{tmp}/orig.json"],
            "bare": [sys.executable, "-m", "bench.bench_score", "--child", "bare", str(data)],
        }
        wall, cpu, outputs = {}, {}, {}
        for _ in range(repeats):  # interleaved, so a busy moment on the machine hits all three alike
            for name, cmd in commands.items():
                w, c, outputs[name] = timed(cmd)
                wall[name], cpu[name] = min(wall.get(name, w), w), min(cpu.get(name, c), c)
        ours_cer = json.loads(Path(f"{tmp}/ours.json").read_text(encoding="utf-8"))["overall_cer"]
        bare_cer = float(outputs["bare"])
    if abs(ours_cer - bare_cer) > 1e-12:  # the bare loop must have scored the very same pairs
        sys.exit(f"bench_score: overall CER differs: ours {ours_cer} vs bare loop {bare_cer}")
    return wall, cpu


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["original", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("paths", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child == "original":
        return original_way(*args.paths)
    if args.child == "bare":
        return bare_way(*args.paths)

    print(f"bench_score: {args.samples} pairs, whole process, best of {args.repeats} runs each")
    for case, marks in CASES.items():
        wall, cpu = run_bench(args.samples, args.repeats, marks)
        print(f" {case}:")
        for label, t in (("wall", wall), ("cpu ", cpu)):
            report(label, t)


def report(label, t):
    speedup, overhead = t["original"] / t["ours"], t["ours"] / t["bare"]
    print(f"  {label}: ours {t['ours']:.2f} s, original's way {t['original']:.2f} s, bare loop {t['bare']:.2f} s"
          f" | original/ours {speedup:.1f}x (target >= 10: {'met' if speedup >= 10 else 'MISSED'}),"
          f" ours/bare {overhead:.2f}x (target <= 2: {'met' if overhead <= 2 else 'MISSED'})")


if __name__ == "__main__":
    main()
