"""Tesseract 5: a classical OCR baseline through the same runner and output format as the models.

It is given the loader's pixels (stages/lib/images.py) as a PNG on stdin, not the raw file, so it
sees what training and the served models see (EXIF orientation, transparency on white, ...)."""
import os
import subprocess
import tempfile
from pathlib import Path

from ... import params as P
from ...cli import UserError
from ...images import ImageError, load_image, png_bytes
from ..client import SampleError
from ..confidence import tesseract_confidence

PARAMS = ("runs.engines.tesseract",)


def settings(params):
    return {"lang": P.get(params, "runs.engines.tesseract.lang", str),
            "psm": P.get(params, "runs.engines.tesseract.psm", int, minimum=0, maximum=13)}


def identity(settings):
    try:
        version = subprocess.run(["tesseract", "--version"], capture_output=True, text=True, timeout=30)
        langs = subprocess.run(["tesseract", "--list-langs"], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        raise UserError("tesseract is not installed (`make setup` installs tesseract-ocr and tesseract-ocr-chi-tra)") from None
    missing = [code for code in settings["lang"].split("+") if code not in langs.stdout.split()]
    if missing:
        raise UserError(f"tesseract has no language data for {missing} (apt-get install tesseract-ocr-chi-tra)")
    return {"engine": "tesseract", "version": (version.stdout or version.stderr).splitlines()[0].strip(),
            "lang": settings["lang"], "psm": settings["psm"]}


CONFIDENCE = "tesseract_words"   # stages/lib/evaluation/confidence.py


def predictor(settings, timeout):
    env = dict(os.environ, OMP_THREAD_LIMIT="1")  # parallelism comes from our workers, not OpenMP
    # One run writes both the text (the prediction, as `stdout` would give it) and the TSV (word confidences).
    cmd = ["tesseract", "stdin", "OUT", "-l", settings["lang"], "--psm", str(settings["psm"]), "txt", "tsv"]

    def predict(sample):
        try:
            image = png_bytes(load_image(sample["image_path"]))
        except ImageError as err:
            raise SampleError(f"image unreadable: {err}") from None
        with tempfile.TemporaryDirectory(prefix="tesseract-") as tmp:
            base = str(Path(tmp) / "out")
            try:
                done = subprocess.run([base if c == "OUT" else c for c in cmd], input=image, capture_output=True,
                                      timeout=timeout, env=env)
            except subprocess.TimeoutExpired:
                raise SampleError(f"tesseract timed out after {timeout:g} s") from None
            if done.returncode != 0:
                tail = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or ["?"]
                raise SampleError(f"tesseract exit {done.returncode}: {tail[0]}")
            text = Path(base + ".txt").read_bytes().decode("utf-8", "replace")
            tsv = Path(base + ".tsv").read_bytes().decode("utf-8", "replace")
        return {"prediction": text.strip(), "completion_tokens": None, "confidence": tesseract_confidence(tsv),
                "finish_reason": None}   # an engine has no token limit: nothing to cut

    return predict
