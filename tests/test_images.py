"""The one image loader (stages/lib/images.py): every consumer gets the same pixels, for every format
a user's scans come in (issue 13).

Each case is a real file written by Pillow in that format. For each, the pixels that training gets
(training.OcrCollator.read_image), that a served model is sent (the client's request body, decoded as the
server decodes it), that an engine is given (png_bytes of the loader), that merge parity reads and
that the report embeds are compared: they must be identical, and right (upright, paper white).
"""
import base64
import io
import json

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import SERIF
from stages.lib import images, report
from stages.lib.evaluation.client import ChatClient
from stages.lib.synthetic import render_line
import random

INSTRUCTION = "OCR"


def page():
    """An RGB 'scan': black text on white, wider than tall, with a mark in the top-left corner."""
    image = Image.new("RGB", (96, 64), "white")
    line = render_line("台北123", SERIF, 24, 128, random.Random(1)).resize((96, 48))
    image.paste(line, (0, 16))
    ImageDraw.Draw(image).rectangle((0, 0, 7, 7), fill="black")   # orientation mark: top-left
    return image


def transparent(base):
    """Text on a fully transparent background (the RGB under the transparency is black)."""
    gray = np.asarray(base.convert("L"))
    rgba = np.zeros(gray.shape + (4,), np.uint8)
    rgba[..., 3] = 255 - gray   # ink opaque, paper transparent
    return Image.fromarray(rgba, "RGBA")


def write_cases(folder):
    base = page()
    cases = {}

    def save(name, image, **kw):
        path = folder / name
        image.save(path, **kw)
        cases[name] = path

    save("rgb.png", base)
    save("rgba_transparent.png", transparent(base))
    save("la.png", transparent(base).convert("LA"))
    save("palette.png", base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    pal = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    white_index = pal.getpixel((95, 63))
    save("palette_transparent.png", pal, transparency=white_index)
    save("gray.png", base.convert("L"))
    save("bilevel.png", base.convert("1"))
    save("bilevel.tif", base.convert("1"), compression="group4")
    save("gray16.png", Image.fromarray(np.asarray(base.convert("L")).astype("<u2") * 257))
    save("cmyk.jpg", base.convert("CMYK"), quality=95)
    save("cmyk.tif", base.convert("CMYK"))
    save("gray.jpg", base.convert("L"), quality=95)
    # EXIF orientation 6 ("rotate 90 CW to view"): the stored pixels are the page turned 90 CCW
    exif = Image.Exif()
    exif[0x0112] = 6
    save("exif_rotated.jpg", base.rotate(90, expand=True), quality=95, exif=exif.tobytes())
    # a two-page TIFF: page 2 is the page
    save("two_pages.tif", Image.new("RGB", (96, 64), "gray"), save_all=True, append_images=[page()])
    cases["two_pages.tif#page=2"] = f"{cases.pop('two_pages.tif')}#page=2"
    return base, cases


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return write_cases(tmp_path_factory.mktemp("formats"))


def decode_data_url(url):
    assert url.startswith("data:image/png;base64,")
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")


def pixels(image):
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def every_consumer(ref):
    """{consumer: RGB pixels} for one image reference, each taken the way that consumer takes it."""
    from stages.lib.training import OcrCollator

    trained = OcrCollator.read_image({"image_path": str(ref), "ocr_text": "x"})
    body = json.loads(ChatClient("http://127.0.0.1:1", "m", INSTRUCTION, max_tokens=8).body(str(ref)))
    sent = next(part for part in body["messages"][0]["content"] if part["type"] == "image_url")["image_url"]["url"]
    engine = Image.open(io.BytesIO(images.png_bytes(images.load_image(str(ref)))))
    return {"training": pixels(trained), "served model": pixels(decode_data_url(sent)),
            "engine": pixels(engine), "report": pixels(decode_data_url(report.image_data_url(str(ref))))}


@pytest.mark.parametrize("name", ["rgb.png", "rgba_transparent.png", "la.png", "palette.png",
                                  "palette_transparent.png", "gray.png", "bilevel.png", "bilevel.tif", "gray16.png",
                                  "cmyk.jpg", "cmyk.tif", "gray.jpg", "exif_rotated.jpg", "two_pages.tif#page=2"])
def test_training_and_evaluation_get_identical_pixels(cases, name):
    base, refs = cases
    got = every_consumer(refs[name])
    first = got["training"]
    for consumer, array in got.items():
        assert array.shape == first.shape and np.array_equal(array, first), f"{name}: {consumer} differs from training"
    # and they are the right pixels: upright, same size, paper white, ink where the page has ink
    assert first.shape == (64, 96, 3), f"{name}: {first.shape} (not upright?)"
    reference = pixels(base)
    assert np.abs(first - reference).mean() < 12, f"{name}: far from the page ({np.abs(first - reference).mean():.1f})"
    assert first[0:6, 0:6].mean() < 80, f"{name}: the top-left mark is not at the top left"
    assert first[-4:, -4:].mean() > 200, f"{name}: the background is not white"


def test_transparent_background_becomes_white_not_black(cases):
    _, refs = cases
    naive = np.asarray(Image.open(refs["rgba_transparent.png"]).convert("RGB"))
    loaded = np.asarray(images.load_image(refs["rgba_transparent.png"]))
    assert naive.mean() < 5          # what a plain convert("RGB") gives: all black
    assert loaded.mean() > 180       # the loader: white paper, black ink


def test_sixteen_bit_is_scaled_not_clipped(cases):
    _, refs = cases
    naive = np.asarray(Image.open(refs["gray16.png"]).convert("RGB"))
    loaded = np.asarray(images.load_image(refs["gray16.png"]))
    assert naive.mean() > 250        # clipped: everything white
    assert loaded.min() < 60 and loaded.max() == 255


def test_not_an_image_and_bad_pages_are_one_line(tmp_path, cases):
    _, refs = cases
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(images.ImageError, match="is not a readable image"):
        images.load_image(bad)
    with pytest.raises(images.ImageError, match="has 2 page\\(s\\), page 3 asked for"):
        images.load_image(str(refs["two_pages.tif#page=2"]).replace("page=2", "page=3"))
    with pytest.raises(images.ImageError, match="bad page number"):
        images.load_image(f"{bad}#page=0")


def test_content_hash_follows_the_pixels(tmp_path):
    a = tmp_path / "a.png"
    page().save(a)
    first = images.content_hash(a)
    assert images.content_hash(a) == first
    Image.new("RGB", (96, 64), "white").save(a)       # same name, new pixels
    assert images.content_hash(a) != first
    assert images.content_hash(f"{a}#page=1") != images.content_hash(a)
