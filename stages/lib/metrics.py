"""OCR metrics: normalization, CER, bag-of-characters F1 and their aggregates (no torch import).

Exact definitions (the README copies this section)
--------------------------------------------------
normalize(s)
    1. Unicode NFC.
    2. Full-width ASCII forms U+FF01..U+FF5E become U+0021..U+007E, U+3000 (ideographic space)
       becomes a space, and the full-width symbols U+FFE0..U+FFE6 ￠￡￢￣￤￥￦ become ¢£¬¯¦¥₩
       (their <wide> decompositions; ￣ becomes ¯, not NFKC's space + combining macron). No global
       NFKC (it would also change circled digits, units, ...).
    3. Remove every whitespace character (those for which Python's `str.isspace()` is true;
       zero-width characters such as U+200B are not whitespace and are kept).
    4. Remove every character of Python's `string.punctuation` and every character whose Unicode
       category starts with "P" (CJK punctuation such as ，。「」、 included).
    Case is kept. Symbols that are not punctuation (¥ © → ...) are kept, except those in
    `string.punctuation` ($ % + < = > ^ ` | ~ and their full-width forms are removed); the seven
    folded symbols ¢£¬¯¦¥₩ are all kept (categories Sc/Sm/Sk/So, none in string.punctuation).
    Lengths are counted in code points (an emoji is 1; a ZWJ emoji sequence is several).

Per sample, on the normalized reference r and prediction p (d = Levenshtein distance, unit costs):
    CER  = d / len(r); when r is empty: 0 if p is empty, else 1. It can exceed 1.
    F1   : common = size of the multiset intersection of the characters of r and p;
           P = common/len(p), R = common/len(r), F1 = 2PR/(P+R) = 2*common/(len(r)+len(p));
           F1 = 0 when common is 0, and F1 = 1 when r and p are both empty.
           Character order does not matter: a scrambled prediction can have F1 1 and CER > 0.
    NED  = d / max(len(r), len(p)) (bounded normalized edit distance, 0..1); 0 when both empty.

Over the scored samples (samples with an `error` field are never scored: they are counted in
failed_samples and left out of every figure):
    overall_cer    = sum(d) / sum(len(r))  (corpus CER, the original's overall figure; when
                     sum(len(r)) is 0: 0 if sum(d) is 0, else 1)
    overall_f1     = mean of per-sample F1 (the original's overall figure)
    macro_cer      = mean of per-sample CER
    micro_f1       = 2*sum(common) / (sum(len(r)) + sum(len(p))) (F1 of summed counts; 1 when both
                     sums are 0, 0 when sum(common) is 0)
    exact_match    = share of samples whose normalized prediction equals the normalized reference
    normalized_edit_distance = mean of per-sample NED
    empty_predictions = number of samples whose prediction is empty after normalization
    *_ci95_low/high = 95% percentile bootstrap interval of overall_cer and overall_f1: B resamples
                     of the n samples with replacement (B = score.bootstrap_samples, seeded by
                     score.seed), the 2.5th and 97.5th percentiles (linear interpolation).

How the bootstrap stays cheap: a resample of n indices is a multinomial draw of how often each
sample is picked, and samples with the same (d, len(r)) (for CER) or the same F1 (for F1) are
interchangeable, so we draw counts per distinct value (numpy's multinomial, a few thousand
values) instead of n indices per resample. Same distribution, independent of sample order.
"""
import functools
import string
import sys
import unicodedata

from rapidfuzz.distance import Indel, Levenshtein

FULLWIDTH_FIRST, FULLWIDTH_LAST, FULLWIDTH_OFFSET = 0xFF01, 0xFF5E, 0xFEE0
IDEOGRAPHIC_SPACE = 0x3000
# The rest of the full-width block: Unicode's <wide> forms of these seven symbols (PP-OCRv6 writes
# ￥ for ¥). Not an offset: their counterparts are scattered (₩ is U+20A9).
FULLWIDTH_SYMBOLS = {ord(wide): ord(narrow) for wide, narrow in zip("￠￡￢￣￤￥￦", "¢£¬¯¦¥₩")}
# Every whitespace and P* code point lies below U+20000 (planes 2-16 hold CJK extensions, tags
# and private use; tests/test_metrics.py checks this against a full scan), so the table covers
# planes 0-1 only and code points above it are kept as they are (str.translate's LookupError rule).
TABLE_SIZE = 0x20000


def is_removed(char):
    """True for the characters that normalization deletes (after full-width folding)."""
    return char.isspace() or char in string.punctuation or unicodedata.category(char).startswith("P")


def translated(code):
    """What normalization (after NFC) makes of one code point: a code point, or None (removed)."""
    if FULLWIDTH_FIRST <= code <= FULLWIDTH_LAST:
        # Folding first and removing second: a full-width form is deleted exactly when its ASCII
        # counterpart is (every full-width non-alphanumeric folds into string.punctuation).
        code -= FULLWIDTH_OFFSET
    elif code == IDEOGRAPHIC_SPACE:
        return None  # folds to a space, which is removed
    elif code in FULLWIDTH_SYMBOLS:
        code = FULLWIDTH_SYMBOLS[code]  # then kept: none of the seven is removed (see the docstring)
    return None if is_removed(chr(code)) else code


def build_table(size=TABLE_SIZE):
    """A str.translate table as a list indexed by code point: None deletes, an int maps.

    A list lookup is about twice as fast as a dict lookup in str.translate, and translate runs
    the whole string in C, where a per-character Python loop would dominate scoring time."""
    return [translated(code) for code in range(size)]


@functools.cache
def translation_table():
    return build_table()  # built on first use (~0.02 s), then shared


nfc = functools.partial(unicodedata.normalize, "NFC")


def normalize(text):
    """The normalized form of `text` (see the module docstring)."""
    return nfc(text).translate(translation_table())


SEPARATOR = "\x00"  # kept by the table (not whitespace, not punctuation), so it splits the result back
DELETE = 0xFFFFFFFF  # marks a deleted code point in the numpy lookup table
UNSET = 0xFFFFFFFE  # marks a code point whose entry is not filled in yet
PAD = sys.maxunicode + 1  # not a code point: fills the room a window shrank by under NFC; deleted
NFC_UNSET = 2  # marks a code point whose nfc_may_change() is not filled in yet (else 0 or 1)
# Texts (or pairs) handled together by normalize_many and common_counts. Blocks keep numpy's
# temporary arrays small, so that the allocator reuses their memory from one block to the next:
# on 200,000 texts at once, touching fresh memory (page faults) cost more than the work itself.
BLOCK = 1024


@functools.cache
def lookup_array():
    """translated() of every code point, as a numpy array for normalize_block (DELETE for removed
    ones, and for PAD). normalize_block fills the entries in as texts use their code points, a few
    hundred in practice: computing the 131,072 entries of translation_table() up front takes 0.02 s."""
    import numpy as np

    table = np.full(PAD + 1, UNSET, dtype=np.uint32)
    table[PAD] = DELETE
    return table


def nfc_may_change(char):
    """False only for characters with NFC_Quick_Check=Yes and combining class 0: NFC leaves such
    a character as it is and never composes it with, or reorders it around, the one before, so
    text can be cut before it and each part normalized alone. True for the rest, and more: every
    combining class but 0, what NFC changes on its own (singletons, composition exclusions), every
    mark (category M*: the characters that compose with the one before them, a few of class 0
    among them) and the Hangul jamo (composed by rule, not by the decomposition table).
    tests/test_metrics.py checks this against every canonical decomposition."""
    return (unicodedata.combining(char) != 0 or unicodedata.category(char).startswith("M")
            or nfc(char) != char or 0x1100 <= ord(char) <= 0x11FF)


@functools.cache
def nfc_flag_array():
    """nfc_may_change() of every code point as 0/1, filled in by nfc_windows as texts use them."""
    import numpy as np

    return np.full(sys.maxunicode + 1, NFC_UNSET, dtype=np.uint8)


def normalize_many(texts):
    """normalize() of every text, done a block of texts at a time: the block's texts joined, NFC
    of the few spans where it can change anything (nfc_windows), then the table applied as a
    numpy lookup on the UTF-32 code points. Same result as normalize() per text; str.translate
    costs ~25 ns a character on CJK text, which made it scoring's largest cost."""
    texts = list(texts)
    normalized = []
    for start in range(0, len(texts), BLOCK):
        normalized += normalize_block(texts[start:start + BLOCK])
    return normalized


def normalize_block(texts):
    import numpy as np

    joined = SEPARATOR.join(texts)
    if joined.count(SEPARATOR) != len(texts) - 1:  # a text holds the separator itself
        return [normalize(t) for t in texts]
    code_points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    code_points = nfc_windows(code_points)
    if code_points is None:  # NFC lengthened a window (rare: U+0958 and the like): NFC each text
        joined = SEPARATOR.join(map(nfc, texts))
        code_points = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    table = lookup_array()
    mapped = table[code_points]
    unset = mapped == UNSET
    if unset.any():  # code points not seen before
        for code in np.unique(code_points[unset]).tolist():
            result = translated(code)
            table[code] = DELETE if result is None else result
        mapped = table[code_points]
    kept = mapped[mapped != DELETE]
    # Decoded from the array's buffer: kept.tobytes() would copy the code points once more.
    return str(memoryview(kept), "utf-32-le", "surrogatepass").split(SEPARATOR)


def nfc_windows(code_points):
    """The code points of a joined block after NFC of each text, PAD where NFC shortened a text;
    None when NFC would lengthen a window (normalize_block then normalizes whole texts).

    NFC only changes a run of characters that nfc_may_change() flags, together with the character
    just before it (which they may compose with): a window. Everything else stays as it is, so
    only the windows are normalized, all of the block's in one call, and written back in place.
    CPython's NFC of a text that needs it costs ~25 ns a character (~170 on CJK: its composition
    step scans a table per character) where NFD costs ~2: on text with combining marks, NFC of
    whole texts cost more than all the rest of normalization."""
    import numpy as np

    flags = nfc_flag_array()
    flagged = flags[code_points]
    unset = flagged == NFC_UNSET
    if unset.any():  # code points not seen before
        for code in np.unique(code_points[unset]).tolist():
            flags[code] = nfc_may_change(chr(code))
        flagged = flags[code_points]
    marks = np.flatnonzero(flagged)
    if len(marks) == 0:
        return code_points
    first = np.diff(marks, prepend=-2) > 1  # the first flagged character of each run
    run_starts, ends = marks[first], marks[np.append(first[1:], True)] + 1
    # A window starts one character before its run, unless the run starts a text (at the block's
    # start or after a separator): a leading combining mark has nothing to compose with.
    starts = run_starts - ((run_starts > 0) & (code_points[run_starts - 1] != 0))
    lengths = ends - starts
    # The windows, each followed by a separator (in the slot of the character after it): NFC of
    # the whole is NFC of each window, as NFC never composes across the separator.
    windows = np.append(code_points, np.uint32(0))[range_indices(starts, lengths + 1)]
    windows[np.cumsum(lengths + 1) - 1] = 0
    composed = nfc(str(memoryview(windows), "utf-32-le", "surrogatepass")).encode("utf-32-le", "surrogatepass")
    composed = np.frombuffer(composed, dtype=np.uint32)
    new_lengths = np.diff(np.flatnonzero(composed == 0), prepend=-1) - 1
    if (new_lengths > lengths).any():
        return None
    result = code_points.copy()
    result[range_indices(starts, lengths)] = PAD  # what a window shrank by stays PAD
    result[range_indices(starts, new_lengths)] = composed[composed != 0]
    return result


def range_indices(starts, lengths):
    """np.arange(start, start + length) of every (start, length), concatenated."""
    import numpy as np

    offsets = np.cumsum(lengths) - lengths
    return np.repeat(starts - offsets, lengths) + np.arange(int(lengths.sum()))


# ---------------------------------------------------------------- per sample

def common_count(ref, pred):
    """Size of the multiset intersection of the characters of ref and pred: the LCS of the two
    strings with their characters sorted (rapidfuzz's Indel distance = len + len - 2 * LCS)."""
    return (len(ref) + len(pred) - Indel.distance("".join(sorted(ref)), "".join(sorted(pred)))) // 2


def common_counts(refs, preds):
    """common_count of many pairs at once, in numpy (a BLOCK of pairs at a time): each character
    becomes a key (pair index << 21 | code point; code points are < 2**21), the keys of each side
    are sorted and run-length counted, and the multiset intersection of a pair is the sum, over
    the keys both sides have, of the smaller count. No per-pair Python work."""
    import numpy as np

    counts = [block_common_counts(refs[start:start + BLOCK], preds[start:start + BLOCK])
              for start in range(0, len(refs), BLOCK)]
    return np.concatenate(counts) if counts else np.zeros(0, dtype=np.int64)


def block_common_counts(refs, preds):
    import numpy as np

    ref_keys, ref_counts = key_counts(refs)
    pred_keys, pred_counts = key_counts(preds)
    if len(ref_keys) == 0 or len(pred_keys) == 0:
        return np.zeros(len(refs), dtype=np.int64)
    at = np.minimum(np.searchsorted(ref_keys, pred_keys), len(ref_keys) - 1)
    shared = ref_keys[at] == pred_keys
    smaller = np.minimum(ref_counts[at[shared]], pred_counts[shared])
    pair = (pred_keys[shared] >> np.uint32(21)).astype(np.int64)
    return np.bincount(pair, weights=smaller, minlength=len(refs)).astype(np.int64)


def key_counts(texts):
    """(distinct sorted keys, how often each occurs) of the characters of `texts`, a key being
    (text index << 21 | code point).

    The keys are 32-bit: a block's text index is below BLOCK <= 2**11, so a key fits in 32 bits,
    and numpy sorts 32-bit keys about twice as fast as 64-bit ones (the sort is the costliest step)."""
    import numpy as np

    assert len(texts) <= 2 ** 11, "text index and code point must fit in 32 bits"
    lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
    code_points = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    keys = np.repeat(np.arange(len(texts), dtype=np.uint32), lengths) << np.uint32(21) | code_points
    keys.sort()
    if len(keys) == 0:
        return keys, np.zeros(0, dtype=np.int64)
    starts = np.flatnonzero(np.concatenate(([True], keys[1:] != keys[:-1])))
    return keys[starts], np.diff(np.append(starts, len(keys)))


def cer_value(distance, ref_len):
    """CER from counts: distance / ref_len; an empty reference scores 0 if nothing was predicted."""
    if ref_len:
        return distance / ref_len
    return 0.0 if distance == 0 else 1.0


def cer_values(distance, ref_len):
    """cer_value of parallel numpy arrays of counts, element by element."""
    import numpy as np

    return np.where(ref_len > 0, distance / np.maximum(ref_len, 1), np.where(distance == 0, 0.0, 1.0))


def f1_value(common, ref_len, pred_len):
    """F1 from counts: 2*common/(ref_len+pred_len); 1 when both are empty, 0 when nothing matches."""
    if ref_len == 0 and pred_len == 0:
        return 1.0
    return 2 * common / (ref_len + pred_len)


def ned_value(distance, ref_len, pred_len):
    longest = max(ref_len, pred_len)
    return distance / longest if longest else 0.0


def cer(reference, prediction):
    """CER of one pair of strings as given (normalize them first for the normalized figure)."""
    return cer_value(Levenshtein.distance(reference, prediction), len(reference))


def f1(reference, prediction):
    """Bag-of-characters F1 of one pair of strings as given."""
    return f1_value(common_count(reference, prediction), len(reference), len(prediction))


def corpus_cer(references, predictions):
    """Summed distances / summed reference lengths over pairs of strings as given."""
    distance = sum(map(Levenshtein.distance, references, predictions))
    return cer_value(distance, sum(map(len, references)))


# ---------------------------------------------------------------- label-length buckets

# (low, high) ranges of normalized label length, both ends included; high None: no upper end.
# The score stage's plots/score/cer_by_length and the analyze stage's report group by these.
LENGTH_BUCKETS = [(0, 0), (1, 5), (6, 10), (11, 20), (21, 40), (41, 80), (81, 160), (161, 320),
                  (321, 640), (641, 1280), (1281, 2560), (2561, None)]


def length_bucket(length):
    """The (low, high) of LENGTH_BUCKETS that holds `length`."""
    for low, high in LENGTH_BUCKETS:
        if length >= low and (high is None or length <= high):
            return low, high
    raise ValueError(f"no length bucket holds {length!r}")  # LENGTH_BUCKETS covers 0 and up


# ---------------------------------------------------------------- many samples

def score_pairs(refs, preds):
    """Per-sample counts and scores of already-normalized pairs, as parallel numpy arrays.

    The same rules as cer_value/f1_value/ned_value, applied to whole arrays at once."""
    import numpy as np

    n = len(refs)
    distance = np.fromiter(map(Levenshtein.distance, refs, preds), dtype=np.int64, count=n)
    ref_len = np.fromiter(map(len, refs), dtype=np.int64, count=n)
    pred_len = np.fromiter(map(len, preds), dtype=np.int64, count=n)
    longest = np.maximum(ref_len, pred_len)
    # When the distance is just the length difference, the shorter string is a subsequence of
    # the longer and shares all its characters (exact matches included): only the others need
    # the sort-based count, which is the costliest step of scoring.
    common = np.minimum(ref_len, pred_len)
    rest = np.flatnonzero(distance != longest - common).tolist()
    if rest:
        common[rest] = common_counts([refs[i] for i in rest], [preds[i] for i in rest])
    return {
        "distance": distance,
        "ref_len": ref_len,
        "pred_len": pred_len,
        "common": common,
        "cer": cer_values(distance, ref_len),
        "f1": np.where(longest > 0, 2 * common / np.maximum(ref_len + pred_len, 1), 1.0),
        "ned": np.where(longest > 0, distance / np.maximum(longest, 1), 0.0),
        "exact": distance == 0,
    }


def summarize(scores, bootstrap_samples, seed):
    """The aggregate figures (module docstring) of score_pairs' output, as Python numbers."""
    n = len(scores["distance"])
    if n == 0:
        raise ValueError("summarize needs at least one scored sample")
    total_d, total_ref = int(scores["distance"].sum()), int(scores["ref_len"].sum())
    total_pred, total_common = int(scores["pred_len"].sum()), int(scores["common"].sum())
    summary = {
        "overall_cer": cer_value(total_d, total_ref),
        "overall_f1": float(scores["f1"].mean()),
        "macro_cer": float(scores["cer"].mean()),
        "micro_f1": f1_value(total_common, total_ref, total_pred),
        "exact_match": float(scores["exact"].mean()),
        "normalized_edit_distance": float(scores["ned"].mean()),
        "empty_predictions": int((scores["pred_len"] == 0).sum()),
    }
    if bootstrap_samples > 0:
        (cer_lo, cer_hi), (f1_lo, f1_hi) = bootstrap_intervals(scores, bootstrap_samples, seed)
        summary.update(overall_cer_ci95_low=cer_lo, overall_cer_ci95_high=cer_hi,
                       overall_f1_ci95_low=f1_lo, overall_f1_ci95_high=f1_hi)
    return summary


def bootstrap_intervals(scores, resamples, seed, level=0.95):
    """Percentile bootstrap intervals ((low, high) of overall_cer, (low, high) of overall_f1)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = len(scores["distance"])
    tail = (1 - level) / 2

    # overall_cer of a resample = sum(d) / sum(len(r)): draw how often each distinct (d, len(r))
    # pair is picked. np.unique sorts, so the groups do not depend on the order of the samples.
    width = int(scores["ref_len"].max()) + 1
    pairs, sizes = np.unique(scores["distance"] * width + scores["ref_len"], return_counts=True)
    counts = _resample_counts(rng, n, sizes, resamples)
    sum_d, sum_ref = counts @ (pairs // width), counts @ (pairs % width)
    cers = cer_values(sum_d, sum_ref)

    # overall_f1 of a resample = mean F1: draw how often each distinct F1 value is picked.
    values, sizes = np.unique(scores["f1"], return_counts=True)
    f1s = _resample_counts(rng, n, sizes, resamples) @ values / n

    return tuple((percentile(stat, tail), percentile(stat, 1 - tail)) for stat in (cers, f1s))


def percentile(values, q):
    """np.quantile's default (linear interpolation), in plain Python: no numpy import (the
    evaluation client uses it for latencies) and none of the ~30 ms import of numpy.ma np.quantile brings."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def _resample_counts(rng, n, group_sizes, resamples, max_cells=4_000_000):
    """(resamples x groups) array: how often each group is picked when n samples are drawn with
    replacement; drawn in chunks so that memory stays bounded when there are many groups."""
    import numpy as np

    probabilities = group_sizes / n
    rows = max(1, max_cells // len(group_sizes))
    chunks = [rng.multinomial(n, probabilities, size=min(rows, resamples - start))
              for start in range(0, resamples, rows)]
    return np.concatenate(chunks)


# ---------------------------------------------------------------- scoring views

# The views of one run side by side (score stage, stage mode), from the least to the most folded:
#   strict          NFC only (every space, punctuation mark, width and script difference counts)
#   no_punctuation  NFC, whitespace and punctuation removed as in normalize(), no width folding
#   normalized      normalize(): the default figure
#   script_folded   normalize(), then OpenCC `tw2s` (Traditional -> Simplified, Taiwan variants
#                   included) on both sides: a Simplified 税 for 稅 is no longer an error
# Each view's CER is its summed distance / its summed label length; the differences between
# neighbouring views say roughly how much of the errors is punctuation and spaces, width, script.
VIEWS = ("strict", "no_punctuation", "normalized", "script_folded")


@functools.cache
def no_punctuation_table():
    return [None if is_removed(chr(code)) else code for code in range(TABLE_SIZE)]


def script_fold_many(normalized_texts, block=2048):
    """OpenCC tw2s of normalized texts, a block at a time joined by newlines (a normalized text
    holds none, and OpenCC keeps them): one call per block instead of one per text."""
    import opencc

    converter = opencc.OpenCC("tw2s")
    out = []
    for start in range(0, len(normalized_texts), block):
        part = normalized_texts[start:start + block]
        folded = converter.convert("\n".join(part)).split("\n")
        out += folded if len(folded) == len(part) else [converter.convert(t) for t in part]
    return out


def view_texts(view, raw_texts, normalized_texts):
    """The texts as `view` sees them (VIEWS), given the raw and the normalize()d texts."""
    if view == "strict":
        return [nfc(t) for t in raw_texts]
    if view == "no_punctuation":
        table = no_punctuation_table()
        return [nfc(t).translate(table) for t in raw_texts]
    if view == "normalized":
        return normalized_texts
    if view == "script_folded":
        return script_fold_many(normalized_texts)
    raise ValueError(f"unknown view {view!r}")


def view_figures(labels, predictions, norm_labels, norm_preds):
    """{view: {"cer", "distance", "label_length"}} of one run's scored pairs (corpus CER per view)."""
    figures = {}
    for view in VIEWS:
        refs, preds = view_texts(view, labels, norm_labels), view_texts(view, predictions, norm_preds)
        distance = sum(map(Levenshtein.distance, refs, preds))
        ref_len = sum(map(len, refs))
        figures[view] = {"cer": cer_value(distance, ref_len), "distance": distance, "label_length": ref_len}
    return figures
