"""Copy metrics/summary.md (written by the analyze stage) into README.md between the
<!-- summary:start --> and <!-- summary:end --> markers, so the README shows produced output."""
import re
import sys
from pathlib import Path

summary = Path("metrics/summary.md")
if not summary.is_file():
    sys.exit("error: metrics/summary.md not found: run `make repro` first")
readme = Path("README.md")
text = readme.read_text(encoding="utf-8")
block = f"<!-- summary:start -->\n{summary.read_text(encoding='utf-8').strip()}\n<!-- summary:end -->"
new, count = re.subn(r"<!-- summary:start -->.*?<!-- summary:end -->", lambda _: block, text, flags=re.S)
if count != 1:
    sys.exit("error: README.md: summary markers not found")
readme.write_text(new, encoding="utf-8")
print("README.md: results section updated from metrics/summary.md")
