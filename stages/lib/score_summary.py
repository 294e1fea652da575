"""The summary's sections on the score stage's details (metrics/score_details.json): paired
comparisons, failure modes, scoring views, tags and confidence, as Markdown lines. Missing parts
(an older details file, a run without tags or confidence) are left out, never invented."""
from . import paired
from .failures import FLAGS
from .metrics import VIEWS


def blocks(details, runs):
    """[(run, its block of the details file)] in the runs table's order, the main run first."""
    main, *others = runs
    found = [(main, details)] + [(run, (details.get("baselines") or {}).get(run["name"])) for run in others]
    return [(run, block) for run, block in found if isinstance(block, dict)]


def num(value, fmt=".4f"):
    return format(value, fmt) if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def p_text(p):
    return paired.p_text(p) if isinstance(p, (int, float)) else "p n/a"


def interval(block, key, fmt="+.4f"):
    low, high = block.get(f"{key}_ci95_low"), block.get(f"{key}_ci95_high")
    text = num(block.get(key), fmt)
    return f"{text} [{num(low, fmt)}, {num(high, fmt)}]" if isinstance(low, (int, float)) else text


def pair_lines(details, runs):
    """One line per pair: the main run against each other run, on the pages both scored."""
    main, *others = runs
    lines = []
    for run in others:
        pair = (details.get("pairs") or {}).get(f"{main['name']}_vs_{run['name']}")
        if not isinstance(pair, dict):
            continue
        lines.append(f"- {main['title']} vs {run['title']}: CER {interval(pair, 'cer_diff')}, {p_text(pair.get('cer_p'))}; "
                     f"F1 {interval(pair, 'f1_diff')}, {p_text(pair.get('f1_p'))}; better on {pair.get('better')} / "
                     f"worse on {pair.get('worse')} / equal on {pair.get('equal')} of {pair.get('pairs')} pages")
    if not lines:
        return []
    return ["Paired comparisons (difference of the corpus figures, main run minus the other, on the pages both "
            "scored; 95% paired bootstrap interval; p: two-sided paired sign-flip permutation test; better/worse: "
            "per-page CER):", "", *lines]


def failure_table(details, runs):
    found = [(run, block) for run, block in blocks(details, runs) if isinstance(block.get("failures"), dict)]
    if not found:
        return []
    lines = ["Failure modes (share of scored samples, count; definitions in stages/lib/failures.py):", "",
             "| model | " + " | ".join(f.replace("_", " ") for f in FLAGS) + " |", "|---|" + "---|" * len(FLAGS)]
    for run, block in found:
        rates, counts = block.get("failure_rates") or {}, block["failures"]
        cells = [f"{num(rates.get(f), '.3f')} ({counts.get(f, 'n/a')})" for f in FLAGS]
        lines.append(f"| {run['title']} | " + " | ".join(cells) + " |")
    return lines


def view_tables(details, runs):
    """One table per run: CER under each scoring view and the edit errors each folding removes."""
    lines = []
    for run, block in blocks(details, runs):
        views = block.get("views")
        if not isinstance(views, dict) or not all(v in views for v in VIEWS):
            continue
        strict = views["strict"]["distance"]
        lines += [f"Scoring views, {run['title']} (each view's CER = its summed edit distance / its summed label "
                  "length; errors: edit distance, and its share of the strict view's):", "",
                  "| view | CER | errors | share of strict errors |", "|---|---|---|---|"]
        for view in VIEWS:
            d = views[view]["distance"]
            share = f"{d / strict:.3f}" if strict else "n/a"
            lines.append(f"| {view.replace('_', ' ')} | {num(views[view]['cer'])} | {d} | {share} |")
        lines.append("")
    return lines


def tag_tables(details, runs):
    lines = []
    for run, block in blocks(details, runs):
        tags = block.get("tags")
        if not isinstance(tags, dict) or not tags:
            continue
        threshold = num(block.get("failure_f1"), "g")
        lines += [f"Per tag, {run['title']} (failure: F1 <= {threshold}):", "",
                  "| tag | samples | CER [95% CI] | F1 [95% CI] | mean CER | failure rate |", "|---|---|---|---|---|---|"]
        for tag, t in tags.items():
            lines.append(f"| {tag} | {t.get('samples')} | {interval(t, 'overall_cer', '.4f')} | "
                         f"{interval(t, 'overall_f1', '.4f')} | {num(t.get('macro_cer'))} | {num(t.get('failure_rate'), '.3f')} |")
        lines.append("")
    return lines


def confidence_lines(details, runs):
    rows = []
    for run, block in blocks(details, runs):
        conf = block.get("confidence")
        if isinstance(conf, dict):
            rows.append(f"| {run['title']} | {block.get('confidence_source') or 'n/a'} | "
                        f"{conf.get('samples_with_confidence')} | {num(conf.get('caught_at_5'), '.3f')} | "
                        f"{num(conf.get('caught_at_10'), '.3f')} | {num(conf.get('caught_at_20'), '.3f')} | "
                        f"`review/{run['name']}.csv` |")
        else:
            rows.append(f"| {run['title']} | none recorded | | | | | |")
    return ["Which pages need a person: share of all edit errors found by checking the least confident 5 / 10 / 20 % "
            "of pages (checking at random finds 0.05 / 0.10 / 0.20); CER by confidence decile: "
            "`plots/score/cer_by_confidence.png`:", "",
            "| model | confidence source | pages | 5 % | 10 % | 20 % | review list |", "|---|---|---|---|---|---|---|",
            *rows]


def sections(details, runs):
    """Every section, separated by blank lines; [] for a details file without any of them."""
    lines = []
    for part in (pair_lines(details, runs), failure_table(details, runs), view_tables(details, runs),
                 tag_tables(details, runs)):
        if part:
            lines += [*part, ""] if part[-1] != "" else part
    if any(isinstance(block.get("confidence"), dict) or "confidence_source" in block for _, block in blocks(details, runs)):
        lines += [*confidence_lines(details, runs), ""]
    return lines
