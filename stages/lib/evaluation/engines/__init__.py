"""OCR engines that are not served models, one module each, with the same small interface:

    settings(params) -> dict       its own keys of params.yaml (`evaluate.<key>`), validated
    identity(settings) -> dict     version and settings: recorded in the output and its resume
                                   fingerprint (UserError when the engine is not installed)
    predictor(settings, timeout) -> predict(sample) -> {"prediction": str, "completion_tokens": None}
                                   sample = {"image_path", "label", ...}; raise SampleError on failure.
                                   Images are read with stages/lib/images.load_image, like training.
    PARAMS                         the params.yaml keys settings() reads (dvc.yaml lists them)

ENGINES names them; load_engine imports one on demand, so a stage depends (in dvc.yaml) only on
the engine it runs.
"""
import importlib

ENGINES = ("tesseract", "paddleocr")


def load_engine(name):
    """The engine module stages/lib/evaluation/engines/NAME.py."""
    return importlib.import_module(f"{__name__}.{name}")
