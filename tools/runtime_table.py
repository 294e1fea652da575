"""Print the time per stage of the last run as a markdown table, from metrics/runtime/STAGE.json
(each stage writes its own when DVC runs it: stages/lib/cli.py). For the README's table:

    python tools/runtime_table.py [metrics/runtime]
"""
import json
import sys
from pathlib import Path


def rows(folder):
    for path in sorted(Path(folder).glob("*.json")):
        figures = json.loads(path.read_text(encoding="utf-8"))
        yield path.stem, figures["wall_s"], figures["cpu_s"], figures["peak_rss_bytes"] / 2 ** 20


def main(argv=None):
    folder = (argv or sys.argv[1:] or ["metrics/runtime"])[0]
    table = list(rows(folder))
    if not table:
        raise SystemExit(f"{folder}: no runtime files (run `dvc repro` first)")
    print("| stage | wall s | CPU s (user + sys) | peak memory MiB |\n|---|---|---|---|")
    for stage, wall, cpu, peak in table:
        print(f"| {stage} | {wall:.0f} | {cpu:.0f} | {peak:.0f} |")
    print(f"| total | {sum(r[1] for r in table):.0f} | {sum(r[2] for r in table):.0f} | |")


if __name__ == "__main__":
    main()
