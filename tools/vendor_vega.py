"""Build .dvc/plots_template.html: DVC's plots page with vega, vega-lite and vega-embed inlined,
so that `dvc plots show` / `dvc plots diff` draw their charts with no network (DVC's own page
loads them from a CDN). `.dvc/config` points DVC at it (`plots.html_template`).

The versions are the ones dvc-render 1.0.2 loads from its CDN (its specs are written for them).
To rebuild (needs the npm registry):

    cd /tmp && npm pack vega@5.20.2 vega-lite@5.2.0 vega-embed@6.18.2
    for f in vega-*.tgz; do mkdir -p "${f%.tgz}" && tar xzf "$f" -C "${f%.tgz}"; done
    python tools/vendor_vega.py /tmp

The scripts are inlined (not linked) so that the page works wherever `-o` writes it; each
package's licence (BSD-3-Clause) is kept in the page, above its script, and in tools/vega/.
"""
import hashlib
import sys
from pathlib import Path

PACKAGES = [("vega", "5.20.2", "build/vega.min.js"),
            ("vega-lite", "5.2.0", "build/vega-lite.min.js"),
            ("vega-embed", "6.18.2", "build/vega-embed.min.js")]
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / ".dvc" / "plots_template.html"
LICENSES = ROOT / "tools" / "vega"

# DVC fills {plot_divs} (and {refresh_tag}); {scripts} is left out on purpose: it holds the CDN links.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {refresh_tag}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- vega, vega-lite and vega-embed inlined by tools/vendor_vega.py (no network needed) -->
%s
    <style>
        table {
            border-spacing: 15px;
        }
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def script_block(name, version, license_text, code):
    if "</script" in code or "{plot_divs}" in code:
        raise SystemExit(f"{name}: the script contains text that would break the page")
    sha = hashlib.sha256(code.encode()).hexdigest()
    return (f"<!-- {name} {version} (npm), {Path(name).name}.min.js sha256 {sha}\n{license_text.strip()}\n-->\n"
            f"<script>{code}</script>")


def main(argv=None):
    src = Path((argv or sys.argv[1:] or ["/tmp"])[0])
    LICENSES.mkdir(parents=True, exist_ok=True)
    blocks = []
    for name, version, script in PACKAGES:
        package = src / f"{name}-{version}" / "package"
        license_text = (package / "LICENSE").read_text(encoding="utf-8")
        (LICENSES / f"LICENSE-{name}-{version}").write_text(license_text, encoding="utf-8")
        blocks.append(script_block(name, version, license_text, (package / script).read_text(encoding="utf-8")))
    TEMPLATE.write_text(PAGE % "\n".join(blocks), encoding="utf-8")
    print(f"wrote {TEMPLATE.relative_to(ROOT)} ({TEMPLATE.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
