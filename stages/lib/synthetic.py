"""Synthetic OCR lines: the text a Traditional Chinese receipt/invoice reader meets, and a
deterministic renderer. Used by the synth stage (the default dataset) and by the base stage
(pre-training lines for the tiny model, in another font mix).

Layout: one character per cell of a GRID x GRID grid, in reading order. That is what lets a
~1 M-parameter model learn to read in minutes on 2 CPU cores (one image token per character);
it is a convenience of synthetic data, not a claim that the tiny model reads proportional text.
"""
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter, ImageFont

from .cli import UserError

GRID = 4                      # 4 x 4 cells: lines of at most 16 characters
MAX_CHARS = GRID * GRID
FONT_DIRS = ["/usr/share/fonts/opentype/noto", "/usr/share/fonts/truetype/noto", "/usr/local/share/fonts"]

CITIES = ["台北市", "新北市", "台中市", "高雄市", "台南市", "桃園市"]
DISTRICTS = ["信義區", "大安區", "中正區", "板橋區", "中山區", "北區"]
ROADS = ["中山路", "中正路", "信義路", "民生路", "忠孝東路", "和平路"]
ITEMS = ["奶茶", "咖啡", "便當", "麵包", "紅茶", "豆漿", "水餃", "雞排", "牛肉麵", "蛋餅"]
SHOPS = ["大同商行", "全家便利商店", "新光百貨", "永和豆漿", "好市多", "誠品書店"]
LABELS = ["合計", "總計", "小計", "金額", "稅額", "現金", "找零", "應付"]
CJK_PUNCT = "，。、：；（）「」！？"
FULL_WIDTH_DIGITS = "０１２３４５６７８９"


def _digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def _full_width(text):
    return "".join(FULL_WIDTH_DIGITS[int(c)] if c.isdigit() else c for c in text)


def _date(rng):
    y, m, d = rng.randint(2019, 2026), rng.randint(1, 12), rng.randint(1, 28)
    return rng.choice([f"{y}年{m:02d}月{d:02d}日", f"{y - 1911}/{m:02d}/{d:02d}", f"{y}-{m:02d}-{d:02d}",
                       f"民國{y - 1911}年{m}月{d}日", f"日期：{y}/{m:02d}/{d:02d}"])


def _amount(rng):
    value = rng.randint(1, 99999)
    label = rng.choice(LABELS)
    return rng.choice([f"NT${value:,}", f"{label}{value}元", f"{label}：{_full_width(str(value))}元",
                       f"{label} ${value}", f"¥{value}", f"{label}{value:,}", f"折扣{rng.randint(5, 50)}%"])


def _invoice(rng):
    letters = "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ") for _ in range(2))
    return rng.choice([f"發票號碼{letters}-{_digits(rng, 8)}", f"統一編號{_digits(rng, 8)}",
                       f"電話02-{_digits(rng, 4)}-{_digits(rng, 4)}", f"收銀機No.{_digits(rng, 2)}",
                       f"{letters}{_digits(rng, 8)}"])


def _address(rng):
    return rng.choice([
        f"{rng.choice(CITIES)}{rng.choice(DISTRICTS)}{rng.choice(ROADS)}",
        f"{rng.choice(ROADS)}{rng.randint(1, 5)}段{rng.randint(1, 300)}號",
        f"{rng.choice(CITIES)}{rng.choice(ROADS)}{rng.randint(1, 99)}號{rng.randint(2, 12)}樓",
    ])


def _item(rng):
    item, qty, price = rng.choice(ITEMS), rng.randint(1, 9), rng.randint(10, 300)
    return rng.choice([f"{item} x{qty} {price}", f"{item}{qty}份{price}元", f"{item}（大）{price}",
                       f"「{rng.choice(SHOPS)}」", f"營業人：{rng.choice(SHOPS)}", f"{item}、{rng.choice(ITEMS)}"])


GENERATORS = [_date, _amount, _invoice, _address, _item]


def random_line(rng):
    """One receipt-like line of 1..MAX_CHARS characters."""
    return tagged_line(rng)[0]


def tagged_line(rng):
    """(one receipt-like line of 1..MAX_CHARS characters, the kind of line: date, amount, invoice,
    address or item), the kind being its tag in the raw data (the score stage reports per tag)."""
    while True:
        generator = rng.choice(GENERATORS)
        text = generator(rng)
        if 0 < len(text) <= MAX_CHARS:
            return text, generator.__name__.lstrip("_")


def charset():
    """Every character the generators can emit (sorted): the tiny tokenizer's alphabet starts here."""
    chars = set("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz$¥%,./:-() x")
    for words in (CITIES, DISTRICTS, ROADS, ITEMS, SHOPS, LABELS):
        chars.update("".join(words))
    chars.update(CJK_PUNCT + FULL_WIDTH_DIGITS + "年月日民國段號樓份元發票碼統一編電話收銀機折扣營業人大日期")
    return sorted(chars)


@lru_cache(maxsize=None)
def load_font(spec, size):
    """`spec` is 'FILE' or 'FILE:FACE NAME' (a face inside a .ttc collection)."""
    file_name, _, face = spec.partition(":")
    path = next((Path(d) / file_name for d in FONT_DIRS if (Path(d) / file_name).is_file()), Path(file_name))
    if not path.is_file():
        raise UserError(f"font '{file_name}' not found in {FONT_DIRS} (install fonts-noto-cjk: `make setup`)")
    for index in range(16):
        try:
            font = ImageFont.truetype(str(path), size, index=index)
        except OSError:
            break
        if not face or " ".join(font.getname()[:1]) == face:
            return font
    raise UserError(f"font '{file_name}' has no face named '{face}'")


def render_line(text, font_spec, font_size, image_size, rng, noise=0.0):
    """Draw `text` one character per cell; jitter, grey level and speckle noise come from rng."""
    if len(text) > MAX_CHARS:
        raise ValueError(f"line longer than {MAX_CHARS} characters: {text!r}")
    cell = image_size // GRID
    font = load_font(font_spec, font_size)
    image = Image.new("L", (image_size, image_size), 255)
    draw = ImageDraw.Draw(image)
    ink = rng.randint(0, 60)
    for i, ch in enumerate(text):
        cx = (i % GRID) * cell + cell // 2 + rng.randint(-2, 2)
        cy = (i // GRID) * cell + cell // 2 + rng.randint(-2, 2)
        draw.text((cx, cy), ch, fill=ink, font=font, anchor="mm")
    if noise > 0:
        pixels = image.load()
        for _ in range(int(noise * image_size * image_size)):
            x, y = rng.randrange(image_size), rng.randrange(image_size)
            pixels[x, y] = rng.randint(120, 255)
        if rng.random() < 0.3:
            image = image.filter(ImageFilter.GaussianBlur(0.6))
    return image.convert("RGB")
