"""Error analysis of scored evaluation outputs (results/*_norm.json) and the offline HTML report.

Everything here works on the normalized text (stages.lib.metrics.normalize), the text that the
CER and F1 figures were computed on; the report also shows the raw label and prediction.
Samples with an `error` field (evaluation failed, no prediction) are counted apart and left out
of every figure, as in scoring. No torch import; rapidfuzz does the edit operations.
"""
import base64
import html
from collections import Counter

from rapidfuzz.distance import Levenshtein

from .cli import UserError
from .metrics import cer_value, normalize_many


def check_result(result, path):
    """The scored file's shape: {"samples": [{"label": str, "prediction": str, ...}]}."""
    if not isinstance(result, dict) or not isinstance(result.get("samples"), list):
        raise UserError(f"{path}: expected an object with a 'samples' list (a normalize-score output)")
    for i, sample in enumerate(result["samples"]):
        if not isinstance(sample, dict):
            raise UserError(f"{path}: sample {i}: expected an object")
        if sample.get("error"):
            continue
        for field in ("label", "prediction"):
            if not isinstance(sample.get(field), str):
                raise UserError(f"{path}: sample {i}: field '{field}' missing or not a string")
        if not isinstance(sample.get("cer_score"), (int, float)) or isinstance(sample.get("cer_score"), bool):
            raise UserError(f"{path}: sample {i}: field 'cer_score' missing or not a number (score it with stages.score)")
    return result


def scored_samples(result):
    """(scored, failed): scored rows carry index, normalized ref/pred and the distance."""
    kept, failed = [], []
    for i, sample in enumerate(result["samples"]):
        if sample.get("error"):
            failed.append({"index": i, "image_path": sample.get("image_path", ""), "error": str(sample["error"])})
        else:
            kept.append((i, sample))
    refs = normalize_many([sample["label"] for _, sample in kept])
    preds = normalize_many([sample["prediction"] for _, sample in kept])
    scored = [{"index": i, "image_path": sample.get("image_path", ""), "label": sample["label"],
               "prediction": sample["prediction"], "ref": ref, "pred": pred,
               "distance": Levenshtein.distance(ref, pred), "cer": float(sample["cer_score"]),
               "f1": sample.get("f1_score")}
              for (i, sample), ref, pred in zip(kept, refs, preds)]
    return scored, failed


def edit_operations(scored):
    """Counters of character substitutions (ref char, predicted char), insertions and deletions."""
    subs, ins, dels = Counter(), Counter(), Counter()
    for row in scored:
        ref, pred = row["ref"], row["pred"]
        for tag, i, j in Levenshtein.editops(ref, pred).as_list():
            if tag == "replace":
                subs[(ref[i], pred[j])] += 1
            elif tag == "insert":
                ins[pred[j]] += 1
            else:
                dels[ref[i]] += 1
    return subs, ins, dels


def cer_by_length(scored, bucket_of):
    """Per bucket of normalized label length (`bucket_of(length)` -> (sort key, label)): samples,
    corpus CER (summed distances / summed lengths, like overall_cer) and mean per-sample CER."""
    buckets = {}
    for row in scored:
        key, label = bucket_of(len(row["ref"]))
        b = buckets.setdefault(key, {"bucket": label, "low": key, "samples": 0, "distance": 0, "characters": 0,
                                     "cer_sum": 0.0})
        b["samples"] += 1
        b["distance"] += row["distance"]
        b["characters"] += len(row["ref"])
        b["cer_sum"] += row["cer"]
    out = []
    for key in sorted(buckets):
        b = buckets[key]
        out.append({"bucket": b["bucket"], "low": key, "samples": b["samples"],
                    "cer": cer_value(b["distance"], b["characters"]),
                    "mean_cer": b["cer_sum"] / b["samples"]})
    return out


def empty_predictions(scored):
    """Samples whose normalized prediction is empty (the model answered nothing readable)."""
    rows = [{"index": r["index"], "image_path": r["image_path"], "label": r["label"], "label_length": len(r["ref"])}
            for r in scored if not r["pred"]]
    lengths = [r["label_length"] for r in rows]
    return {"count": len(rows), "fraction": round(len(rows) / len(scored), 6) if scored else 0.0,
            "label_length_min": min(lengths, default=0), "label_length_max": max(lengths, default=0),
            "label_length_mean": round(sum(lengths) / len(lengths), 3) if lengths else 0.0,
            "label_lengths": dict(sorted(Counter(lengths).items())), "samples": rows}


def analyze_result(result, *, top_k, bucket_of):
    """Everything the report and reports/errors.json need for one model."""
    scored, failed = scored_samples(result)
    subs, ins, dels = edit_operations(scored)
    return {
        "model_name": result.get("model_name", ""),
        "scored_samples": len(scored),
        "failed_samples": len(failed),
        "failed": failed,
        "empty_predictions": empty_predictions(scored),
        "cer_by_length": cer_by_length(scored, bucket_of),
        "substitutions": [{"label": a, "prediction": b, "count": n} for (a, b), n in subs.most_common(top_k)],
        "insertions": [{"prediction": c, "count": n} for c, n in ins.most_common(top_k)],
        "deletions": [{"label": c, "count": n} for c, n in dels.most_common(top_k)],
        "edit_totals": {"substitutions": sum(subs.values()), "insertions": sum(ins.values()),
                        "deletions": sum(dels.values())},
        "_scored": scored,
    }


def worst_samples(scored, n):
    """The n samples with the highest CER above 0 (ties: the longer label first, then input order)."""
    return sorted((r for r in scored if r["cer"] > 0), key=lambda r: (-r["cer"], -len(r["ref"]), r["index"]))[:n]


# ---------------------------------------------------------------- HTML

CSS = """
body{font-family:"Noto Sans CJK TC","Noto Sans TC","PingFang TC","Microsoft JhengHei",sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.3em .6em;vertical-align:top}
th{background:#f3f3f3}.num{text-align:right;font-variant-numeric:tabular-nums}
.diff{font-size:1.25em;letter-spacing:.05em}del{background:#fdd;color:#a00}ins{background:#dfd;color:#060;text-decoration:none}
.sub del,.sub ins{outline:1px dashed #999}.img img{max-width:360px;min-width:160px;image-rendering:pixelated;border:1px solid #ddd}
.row{display:flex;flex-wrap:wrap}.row>div{margin-right:2.5em}.muted{color:#777}.text{font-size:1.15em}code{background:#f6f6f6;padding:0 .2em}
"""


def char_diff_html(ref, pred):
    """Character-level diff of the normalized label and prediction: deleted label characters in
    red, inserted predicted characters in green, a substitution shows both side by side."""
    parts = []
    for tag, i1, i2, j1, j2 in Levenshtein.opcodes(ref, pred).as_list():
        a, b = html.escape(ref[i1:i2]), html.escape(pred[j1:j2])
        if tag == "equal":
            parts.append(f"<span>{a}</span>")
        elif tag == "replace":
            parts.append(f'<span class="sub"><del title="label">{a}</del><ins title="prediction">{b}</ins></span>')
        elif tag == "delete":
            parts.append(f'<del title="missing from the prediction">{a}</del>')
        else:
            parts.append(f'<ins title="not in the label">{b}</ins>')
    return "".join(parts) or '<span class="muted">(both empty)</span>'


def image_data_url(image_path, max_width=640):
    """The image as the loader reads it (any format: TIFF, 16-bit, EXIF-rotated, transparent), as
    a PNG data: URL no wider than max_width (the report must open offline and stay small, and
    browsers do not show TIFF), or None when unreadable."""
    from .images import ImageError, load_image, png_bytes

    try:
        image = load_image(image_path)
    except (ImageError, OSError):
        return None
    if image.width > max_width:
        image = image.resize((max_width, max(1, round(image.height * max_width / image.width))))
    return f"data:image/png;base64,{base64.b64encode(png_bytes(image)).decode('ascii')}"


def _esc(text):
    return html.escape(str(text))


def _table(headers, rows, numeric=()):
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="{"num" if k in numeric else ""}">{_esc(c)}</td>'
                                    for k, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _show_char(c):
    return f"{c} (U+{ord(c):04X})" if c.isspace() or not c.isprintable() else c


def _worst_html(worst):
    rows = []
    for rank, r in enumerate(worst, 1):
        url = image_data_url(r["image_path"])
        img = f'<img alt="{_esc(r["image_path"])}" src="{url}">' if url else '<span class="muted">image not found</span>'
        f1 = f"{r['f1']:.3f}" if isinstance(r["f1"], (int, float)) else ""
        rows.append(
            f'<tr><td class="num">{rank}</td><td class="img">{img}<br><small class="muted">{_esc(r["image_path"])} '
            f'(sample {r["index"]})</small></td>'
            f'<td class="text">{_esc(r["label"]) or "<span class=muted>(empty)</span>"}</td>'
            f'<td class="text">{_esc(r["prediction"]) or "<span class=muted>(empty)</span>"}</td>'
            f'<td class="diff">{char_diff_html(r["ref"], r["pred"])}</td>'
            f'<td class="num">{r["cer"]:.3f}</td><td class="num">{f1}</td></tr>')
    head = "".join(f"<th>{h}</th>" for h in ("#", "image", "label", "prediction",
                                             "diff (normalized: <del>missing</del> <ins>extra</ins>)", "CER", "F1"))
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def errors_html(analyses, worst_n, title="OCR error report"):
    """The whole report as one self-contained HTML string. `analyses` maps a display name to
    analyze_result(); the first one is the model under study (worst samples, edit operations)."""
    (main_name, main), *others = analyses.items()
    empty = main["empty_predictions"]
    totals = main["edit_totals"]
    worst = worst_samples(main["_scored"], worst_n)
    out = [f"<!DOCTYPE html><html lang='zh-Hant'><head><meta charset='utf-8'><title>{_esc(title)}</title>"
           f"<style>{CSS}</style></head><body><h1>{_esc(title)}: {_esc(main_name)}</h1>",
           f"<p>{main['scored_samples']} scored samples of <code>{_esc(main['model_name'])}</code>; "
           f"{main['failed_samples']} failed in evaluation (no prediction, left out); empty predictions: "
           f"{empty['count']}. Edit operations on normalized text: {totals['substitutions']} substitutions, "
           f"{totals['insertions']} insertions, {totals['deletions']} deletions.</p>",
           f"<h2>The {len(worst)} worst samples by CER</h2>",
           _worst_html(worst) if worst else "<p>No sample has a character error.</p>",
           "<h2>Most frequent character errors</h2><div class='row'>",
           "<div><h3>Substitutions</h3>" + _table(["label", "prediction", "count"],
                                                  [(_show_char(s["label"]), _show_char(s["prediction"]), s["count"])
                                                   for s in main["substitutions"]], numeric=(2,)) + "</div>",
           "<div><h3>Deletions (missed)</h3>" + _table(["label char", "count"],
                                                       [(_show_char(s["label"]), s["count"]) for s in main["deletions"]],
                                                       numeric=(1,)) + "</div>",
           "<div><h3>Insertions (extra)</h3>" + _table(["predicted char", "count"],
                                                       [(_show_char(s["prediction"]), s["count"]) for s in main["insertions"]],
                                                       numeric=(1,)) + "</div></div>"]
    names = [main_name] + [name for name, _ in others]
    by_bucket = {}
    for name, analysis in analyses.items():
        for b in analysis["cer_by_length"]:
            by_bucket.setdefault((b["low"], b["bucket"]), {})[name] = b
    rows = [[bucket, max(v["samples"] for v in cells.values())] +
            [f"{cells[n]['cer']:.4f}" if n in cells else "" for n in names]
            for (_, bucket), cells in sorted(by_bucket.items())]
    out.append("<h2>CER by label length (normalized characters; corpus CER per bucket)</h2>")
    out.append(_table(["label length", "samples"] + names, rows, numeric=tuple(range(1, 2 + len(names)))))
    out.append(f"<h2>Empty predictions: {empty['count']} ({empty['fraction']:.1%})</h2>")
    if empty["count"]:
        out.append(f"<p>Label lengths: min {empty['label_length_min']}, mean {empty['label_length_mean']}, "
                   f"max {empty['label_length_max']}.</p>")
        out.append(_table(["sample", "image", "label", "label length"],
                          [(r["index"], r["image_path"], r["label"], r["label_length"]) for r in empty["samples"]],
                          numeric=(0, 3)))
    for name, analysis in others:
        e = analysis["empty_predictions"]
        out.append(f"<p>{_esc(name)}: {e['count']} empty predictions of {analysis['scored_samples']} "
                   f"({e['fraction']:.1%}).</p>")
    if main["failed"]:
        out.append(f"<h2>Failed in evaluation: {len(main['failed'])}</h2>")
        out.append(_table(["sample", "image", "error"], [(f["index"], f["image_path"], f["error"]) for f in main["failed"]]))
    out.append("</body></html>\n")
    return "\n".join(out)


def analysis_json(analyses):
    """reports/errors.json: the analyses without the per-sample working rows."""
    return {name: {k: v for k, v in a.items() if not k.startswith("_")} for name, a in analyses.items()}
