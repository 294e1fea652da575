"""The table of runs: every evaluation of the pipeline, one row each in params.yaml `runs:`.

    runs:
      main: finetuned         # the run metrics/score.json reports at its top level (the others: baselines.NAME)
      models:                 # served models (the evaluate@NAME stages): NAME: {dir, title}
        finetuned: {dir: models/merged, title: fine-tuned}
      engines:                # OCR engines (the engine@NAME stages, stages/lib/evaluation/engines/NAME.py)
        tesseract: {title: Tesseract, lang: chi_tra+eng, psm: 6}

dvc.yaml's `foreach` over the two groups makes the evaluation stages; the score stage, the
analysis and the results page read the same table, so a new run is one row here (plus, for a
new engine, its module).
"""
from pathlib import Path

from . import params as P
from .cli import UserError

RAW_DIR = "results"     # evaluate@NAME / engine@NAME write results/NAME.json (raw figures)
SCORED_DIR = "scored"   # normalize-score writes scored/NAME.json (normalized figures)


def load_runs(params):
    """[{"name", "title", "kind": "model"|"engine", "settings": row}]: the main run first, then the table's order."""
    table = P.get(params, "runs", dict)
    runs = []
    for kind, group in (("model", "models"), ("engine", "engines")):
        rows = table.get(group) or {}
        if not isinstance(rows, dict):
            raise UserError(f"params.yaml: 'runs.{group}' must be a mapping of NAME: {{...}}")
        for name, row in rows.items():
            if not isinstance(row, dict) or not isinstance(row.get("title"), str):
                raise UserError(f"params.yaml: 'runs.{group}.{name}' must be a mapping with a 'title'")
            if not str(name).replace("_", "").isalnum():
                raise UserError(f"params.yaml: 'runs.{group}.{name}': run names are letters, digits and _")
            runs.append({"name": str(name), "title": row["title"], "kind": kind, "settings": row})
    titles = {}
    for run in runs:   # reports and pages key runs by title: two runs under one title would mix
        if run["title"] in titles:
            raise UserError(f"params.yaml: runs '{titles[run['title']]}' and '{run['name']}' have the same title "
                            f"{run['title']!r}; give each run its own title")
        titles[run["title"]] = run["name"]
    main = P.get(params, "runs.main", str)
    names = [run["name"] for run in runs]
    if main not in names:
        raise UserError(f"params.yaml: 'runs.main' {main!r} is not a run of the table ({', '.join(names) or 'none'})")
    return sorted(runs, key=lambda run: run["name"] != main)   # stable: the rest keep their order


def raw_path(name, results_dir=RAW_DIR):
    return Path(results_dir) / f"{name}.json"


def scored_path(name, scored_dir=SCORED_DIR):
    return Path(scored_dir) / f"{name}.json"
