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

Bounded work on hostile files: an image (or a PDF page as rendered) over MAX_PIXELS and a file of
more than MAX_PAGES pages are refused with one line, before their pixels are decoded; the pages of
a multi-page file are read in one pass (iter_pages) and the file is hashed once, not once per page.
"""
import functools
import hashlib
import io
from pathlib import Path

# 100 megapixels: a 600 dpi A3 scan is 70 MP; a 60000 x 60000 "decompression bomb" PNG is 3,600 MP.
MAX_PIXELS = 100_000_000
MAX_PAGES = 1000   # pages of one PDF or TIFF (split a longer file into several)
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


def check_pixels(path, size, what="image"):
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageError(f"'{path}' {what} is {width} x {height} pixels, over the limit of "
                         f"{MAX_PIXELS // 1_000_000} megapixels (stages/lib/images.py MAX_PIXELS); scale it down")


def check_page_count(path, count):
    if count > MAX_PAGES:
        raise ImageError(f"'{path}' has {count} pages, over the limit of {MAX_PAGES} per file "
                         "(stages/lib/images.py MAX_PAGES); split it into several files")


def _open(path):
    """Image.open with the size checked before any pixel is decoded."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_PIXELS   # PIL warns above this and refuses above twice this
    try:
        image = Image.open(path)
    except Image.DecompressionBombError:   # PIL's own limit (2x its MAX_IMAGE_PIXELS): far over ours
        raise ImageError(f"'{path}' is a decompression bomb (over {MAX_PIXELS // 1_000_000} megapixels)") from None
    try:
        check_pixels(path, image.size)
    except ImageError:
        image.close()
        raise
    return image


def open_frame(ref):
    """The PIL image of `ref` (the right frame of a multi-page file), not yet converted."""
    from PIL import Image, UnidentifiedImageError

    path, page = split_ref(ref)
    if path.suffix.lower() in PDF_SUFFIXES:
        raise ImageError(f"'{path}' is a PDF: the split stage renders its pages (name it in the raw data)")
    if not path.is_file():
        raise ImageError(f"'{path}' does not exist")
    try:
        image = _open(path)
        if page is not None:
            frames = page_count(path)
            if page > frames:
                raise ImageError(f"'{path}' has {frames} page(s), page {page} asked for")
            image.seek(page - 1)
            check_pixels(f"{path}{PAGE_MARK}{page}", image.size)
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"'{path}' is not a readable image ({type(err).__name__})") from None
    return image


def _file_key(path):
    """(path, size, mtime): a cache key that changes whenever the file does."""
    st = Path(path).stat()
    return str(path), st.st_size, st.st_mtime_ns


def page_count(path):
    """Frames of an image file (1 for most; several for a multi-page TIFF). Counting walks the whole
    TIFF, so it is done once per file version."""
    return _page_count(*_file_key(path))


@functools.lru_cache(maxsize=256)
def _page_count(path, size, mtime_ns):
    from PIL import UnidentifiedImageError

    try:
        with _open(path) as image:
            count = getattr(image, "n_frames", 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageError(f"'{path}' is not a readable image ({type(err).__name__})") from None
    check_page_count(path, count)
    return count


def iter_pages(path):
    """(page number, 8-bit RGB) of every page of an image file, in one pass over the file
    (load_image of each `path#page=N` would walk the file from its start every time)."""
    from PIL import UnidentifiedImageError

    count = page_count(path)
    try:
        with _open(path) as image:
            for index in range(count):
                image.seek(index)
                check_pixels(f"{path}{PAGE_MARK}{index + 1}", image.size)
                image.load()
                yield index + 1, to_rgb(image)
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
    digest = _file_digest(*_file_key(path)).copy()   # every page of a file: the file read once
    if page is not None:
        digest.update(f"{PAGE_MARK}{page}".encode())
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _file_digest(path, size, mtime_ns):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest
