"""The one image loader. Training, validation CER, merge parity, requests to a served model,
Tesseract and every other engine, and the reports all call load_image, so each of them sees
the same pixels.

An image reference is a file path, or `path#page=N` (1-based) for one page of a multi-page
TIFF. (PDF pages are rendered to PNG by the split stage; rows then name the rendered file.)

What load_image does, in this order:
1. EXIF orientation is applied (a phone photo tagged "rotate 90" is seen upright).
2. 16-bit and 32-bit grayscale (I;16, I, F) are scaled to 8 bits by their full range
   (65535 -> 255), not clipped.
3. Transparency (RGBA, LA, PA, a palette with a transparent colour) is composited onto WHITE:
   a transparent background is paper, not black ink (a plain convert("RGB") makes it black).
4. Everything else (1-bit, L, P, CMYK, YCbCr, LAB, ...) is converted with PIL's convert("RGB").
The result is always an 8-bit RGB image.
"""
import hashlib
import io
from pathlib import Path

PAGE_MARK = "#page="
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
PDF_SUFFIXES = (".pdf",)


class ImageError(Exception):
    """An image that cannot be read; the message says why in a few words."""


def split_ref(ref):
    """'scan.tif#page=2' -> (Path('scan.tif'), 2); 'a.png' -> (Path('a.png'), None)."""
    ref = str(ref)
    if PAGE_MARK in ref:
        path, _, page = ref.rpartition(PAGE_MARK)
        if not page.isdigit() or int(page) < 1:
            raise ImageError(f"bad page number in '{ref}' (expected {PAGE_MARK}N, N >= 1)")
        return Path(path), int(page)
    return Path(ref), None


def page_ref(path, page):
    return f"{path}{PAGE_MARK}{page}"


def open_frame(ref):
    """The PIL image of `ref` (the right frame of a multi-page file), not yet converted."""
    from PIL import Image, UnidentifiedImageError

    path, page = split_ref(ref)
    if path.suffix.lower() in PDF_SUFFIXES:
        raise ImageError(f"'{path}' is a PDF: the split stage renders its pages (name it in the raw data)")
    if not path.is_file():
        raise ImageError(f"'{path}' does not exist")
    try:
        image = Image.open(path)
        frames = getattr(image, "n_frames", 1)
        if page is not None:
            if page > frames:
                raise ImageError(f"'{path}' has {frames} page(s), page {page} asked for")
            image.seek(page - 1)
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"'{path}' is not a readable image ({type(err).__name__})") from None
    return image


def page_count(path):
    """Frames of an image file (1 for most; several for a multi-page TIFF)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return getattr(image, "n_frames", 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"'{path}' is not a readable image ({type(err).__name__})") from None


def to_rgb(image):
    """EXIF orientation, bit depth, transparency and colour model -> 8-bit RGB (see the module doc)."""
    import numpy as np
    from PIL import Image, ImageOps

    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(ref):
    """The 8-bit RGB pixels of an image reference, the same for every consumer (ImageError if unreadable)."""
    image = open_frame(ref)
    try:
        return to_rgb(image)
    finally:
        image.close()


def png_bytes(image):
    """Lossless PNG of a loaded image: what requests and engines are given instead of the raw file."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def content_hash(ref):
    """sha256 of the file's bytes (and the page, for one page of a multi-page file): the data version
    of one sample. Any change of pixels changes it; the split rows carry it."""
    path, page = split_ref(ref)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if page is not None:
        digest.update(f"{PAGE_MARK}{page}".encode())
    return digest.hexdigest()
