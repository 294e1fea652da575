"""PaddleOCR's PP-OCRv6 models through RapidOCR (onnxruntime, CPU): a second classical OCR baseline.

Bundled models only. rapidocr 3.10.0 ships PP-OCRv6 *small* detection and recognition models and
the v2.0 mobile direction classifier inside its wheel; the recognition dictionary (18,708
characters, in the ONNX metadata `character`) covers Traditional Chinese. Every model file is
resolved here with rapidocr's own routing table and handed to RapidOCR as an explicit path, so
nothing is ever downloaded at run time; a setting whose model the wheel does not bundle
(det_model/rec_model `tiny` or `medium`) is refused with one line naming the parameter.

Settings (params.yaml `runs.engines.paddleocr`):
    title       the run's title (the runs table)
    det_model   PP-OCRv6 detection model type: small (the only one bundled)
    rec_model   PP-OCRv6 recognition model type: small (the only one bundled)
    use_cls     run the 0/180 degree text-direction classifier on each box (RapidOCR's default: true)
    limit_type  how the detector resizes the image: min | max | auto
                  min: short side brought up to 736 px (RapidOCR's default; upscales small images)
                  max: long side brought down to 960 px, never upscaled
                  auto: `max` when the image is a strip, i.e. its short side is below 736 px and
                        upscaling it to 736 px would take the long side past 2048 px
                        (long/short > 2.78: single text lines); otherwise `min`.
                Measured on 2 cores: on 64 px single lines (~300 px wide) min is ~20x slower than
                max (3.1 s vs 0.15 s per line) and no more accurate; on the default 128 px square
                images max loses accuracy (corpus CER 0.114 vs 0.041 over 50 lines).
    threads     onnxruntime intra-op threads per engine; 0 = os.cpu_count() (values above it are
                capped at it).

Threads and `evaluate.workers`: the runner calls predict from `workers` threads and each worker
thread builds its own RapidOCR engine (lazily, on its first sample), so up to workers x threads
onnxruntime threads compute at once: keep workers x threads near the number of cores. Measured with
2 workers on 2 cores (30 default images): one engine per thread with threads 1: 0.19-0.22 s/image;
one shared engine behind a lock with threads 2: 0.28-0.35 s/image; one engine per thread with
threads 2 (4 threads on 2 cores): 0.38 s/image.

The image is the loader's (stages/lib/images.load_image: the pixels training sees), given to
RapidOCR as a BGR numpy array (RapidOCR takes a 3-channel array as OpenCV's BGR). Its text boxes
are joined into lines: boxes whose vertical centres lie within half a box height of a line's
centre belong to that line; boxes are read left to right within a line (texts joined by a space),
lines top to bottom, joined by "\\n". A blank image gives "". The evaluate runner's per-request
`timeout` is not applied: the engine runs in-process and onnxruntime cannot be interrupted.
"""
import os
import threading
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from ... import params as P
from ...cli import UserError
from ...images import ImageError, load_image
from ..client import SampleError
from ..confidence import weighted_score

PARAMS = ("runs.engines.paddleocr",)
CONFIDENCE = "paddleocr_scores"   # stages/lib/evaluation/confidence.py
KEY = "runs.engines.paddleocr"
OCR_VERSION = "PP-OCRv6"
MODEL_TYPES = ("tiny", "small", "medium")          # PP-OCRv6 det/rec types rapidocr knows
CLS_MODEL = ("PP-OCRv4", "mobile")                 # RapidOCR's default classifier (config.yaml Cls)
LIMIT_TYPES = ("auto", "min", "max")
MIN_SIDE = 736        # limit_type min: the short side is brought up to this
MAX_SIDE = 960        # limit_type max: the long side is brought down to this
AUTO_LONG_CAP = 2048  # auto: min unless it would make the long side longer than this
INSTALL_HINT = "pip install rapidocr==3.10.0 onnxruntime==1.32.0 (requirements.txt)"


def settings(params):
    P.get(params, KEY, dict)
    get = lambda key, kind, **kw: P.get(params, f"{KEY}.{key}", kind, **kw)  # noqa: E731
    return {"det_model": get("det_model", str, choices=MODEL_TYPES),
            "rec_model": get("rec_model", str, choices=MODEL_TYPES),
            "use_cls": get("use_cls", bool),
            "limit_type": get("limit_type", str, choices=LIMIT_TYPES),
            "threads": get("threads", int, minimum=0)}


def _packages():
    """(rapidocr version, onnxruntime version); UserError when either is missing."""
    try:
        import onnxruntime  # noqa: F401
        import rapidocr  # noqa: F401
    except ImportError as err:
        raise UserError(f"the paddleocr engine needs rapidocr and onnxruntime ({err.name} is not installed): "
                        f"{INSTALL_HINT}") from None
    return metadata.version("rapidocr"), metadata.version("onnxruntime")


def _bundled_path(task, version, model_type):
    """The file rapidocr would use for (task, version, type), in the installed package's models/."""
    import rapidocr
    from rapidocr.inference_engine.base import FileInfo, InferSession
    from rapidocr.utils.typings import EngineType, ModelType, OCRVersion, TaskType

    info = InferSession.get_model_url(FileInfo(engine_type=EngineType.ONNXRUNTIME, ocr_version=OCRVersion(version),
                                               task_type=TaskType(task), lang_type="ch",
                                               model_type=ModelType(model_type)))
    return Path(rapidocr.__file__).resolve().parent / "models" / Path(info["model_dir"]).name


def model_files(settings):
    """{"det", "rec", "cls"} -> Path of the bundled model file each setting uses. UserError, naming
    the parameter, when a setting asks for a model the installed rapidocr does not bundle (it
    would try to download it)."""
    rapidocr_version, _ = _packages()
    files = {}
    for task in ("det", "rec"):
        key = f"{task}_model"
        path = _bundled_path(task, OCR_VERSION, settings[key])
        if not path.is_file():
            bundled = [t for t in MODEL_TYPES if _bundled_path(task, OCR_VERSION, t).is_file()]
            raise UserError(f"params.yaml: '{KEY}.{key}' is {settings[key]!r}: rapidocr {rapidocr_version} does not "
                            f"bundle {path.name} (bundled: {', '.join(bundled) or 'none'}) and models are never "
                            "downloaded at run time")
        files[task] = path
    path = _bundled_path("cls", *CLS_MODEL)
    if not path.is_file():
        raise UserError(f"rapidocr {rapidocr_version} does not bundle its direction classifier {path.name} "
                        f"(reinstall: {INSTALL_HINT})")
    files["cls"] = path
    return files


@lru_cache(maxsize=None)
def _sha256(path, size, mtime):
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path):
    stat = Path(path).stat()
    return _sha256(str(path), stat.st_size, stat.st_mtime_ns)


def identity(settings):
    rapidocr_version, ort_version = _packages()
    files = model_files(settings)
    return {"engine": "paddleocr", "version": f"rapidocr {rapidocr_version} / onnxruntime {ort_version}",
            **{f"{task}_file": f"{path.name} sha256:{file_sha256(path)[:12]}" for task, path in files.items()},
            **settings}


def effective_threads(threads):
    cores = os.cpu_count() or 1
    return cores if threads == 0 else min(threads, cores)


def detector_limit(width, height, limit_type):
    """(limit_type, limit_side_len) the detector uses for an image of this size (see the module doc)."""
    if limit_type == "auto":
        short, long = min(width, height), max(width, height)
        strip = short < MIN_SIDE and long * MIN_SIDE / max(short, 1) > AUTO_LONG_CAP
        limit_type = "max" if strip else "min"
    return (limit_type, MIN_SIDE if limit_type == "min" else MAX_SIDE)


def build_engine(settings, files, limit):
    """A RapidOCR engine on the bundled files, with the detector resizing by `limit`."""
    from rapidocr import RapidOCR

    limit_type, side = limit
    return RapidOCR(params={
        "Global.log_level": "error", "Global.use_cls": settings["use_cls"],
        # explicit files: RapidOCR's model_type/ocr_version only route downloads, never made here
        "Det.model_path": str(files["det"]), "Det.limit_type": limit_type, "Det.limit_side_len": side,
        "Rec.model_path": str(files["rec"]), "Cls.model_path": str(files["cls"]),
        "EngineConfig.onnxruntime.intra_op_num_threads": effective_threads(settings["threads"])})


def join_lines(boxes, texts):
    """Texts of boxes (4 corner points each) as lines: a box joins the line whose vertical centre is
    within half a box height of its own (the box's or the line's mean height, the larger), boxes
    left to right within a line joined by a space, lines top to bottom joined by "\\n"."""
    if boxes is None or texts is None:
        return ""
    items = []
    for box, text in zip(boxes, texts):
        text = (text or "").strip()
        if not text:
            continue
        ys = [float(point[1]) for point in box]
        xs = [float(point[0]) for point in box]
        items.append(((min(ys) + max(ys)) / 2, max(max(ys) - min(ys), 1.0), min(xs), text))
    lines = []   # [centre sum, height sum, [(x, text), ...]]
    for centre, height, left, text in sorted(items):
        if lines:
            line = lines[-1]
            count = len(line[2])
            if abs(centre - line[0] / count) <= 0.5 * max(height, line[1] / count):
                line[0] += centre
                line[1] += height
                line[2].append((left, text))
                continue
        lines.append([centre, height, [(left, text)]])
    return "\n".join(" ".join(text for _, text in sorted(words, key=lambda w: w[0])) for _, _, words in lines)


def predictor(settings, timeout):
    """predict(sample): one RapidOCR engine per worker thread and detector setting, built on first use."""
    import numpy as np

    files = model_files(settings)
    local = threading.local()

    def engine(limit):
        engines = getattr(local, "engines", None)
        if engines is None:
            engines = local.engines = {}
        if limit not in engines:
            engines[limit] = build_engine(settings, files, limit)
        return engines[limit]

    def predict(sample):
        try:
            image = load_image(sample["image_path"])
        except ImageError as err:
            raise SampleError(f"image unreadable: {err}") from None
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        try:
            result = engine(detector_limit(image.width, image.height, settings["limit_type"]))(bgr)
        except Exception as err:  # noqa: BLE001 - any failure of the engine is this sample's error
            message = str(err).strip().splitlines()
            raise SampleError(f"rapidocr failed: {type(err).__name__}: {message[-1] if message else ''}") from None
        texts = getattr(result, "txts", None)
        return {"prediction": join_lines(getattr(result, "boxes", None), texts), "completion_tokens": None,
                "confidence": weighted_score(texts, getattr(result, "scores", None)), "finish_reason": None}

    return predict
