"""CI: the report that README command 1 announced exists and its key-results box holds numbers.

Usage: python .ci/check_report.py DEMO_LOG   (the demo's terminal output; its last
'report: PATH' line names the report). Prints the key results as text; exit 1 if the
report, the box, or the adjusted Rand index against the planted strata is missing.
"""
import html
import re
import sys
from pathlib import Path

log = Path(sys.argv[1]).read_text(errors="replace")
paths = re.findall(r"^report: (\S+)$", log, re.M)
if not paths:
    sys.exit("check_report: the demo printed no 'report: PATH' line")
report = Path(paths[-1])
if not report.is_file():
    sys.exit(f"check_report: {report}: the announced report does not exist")
box = re.search(r"<div class='keyresults'>(.*?)</div>", report.read_text(), re.S)
if not box:
    sys.exit(f"check_report: {report}: no key-results box")
text = html.unescape(re.sub(r"<[^>]+>", " ", box.group(1)))
text = re.sub(r"[ \t]+", " ", text).strip()
print(f"key results of {report}:\n  {text}")
ari = re.search(r"adjusted Rand index (-?\d+\.\d+)", text)
if not ari:
    sys.exit(f"check_report: {report}: the key results hold no adjusted Rand index")
print(f"adjusted Rand index vs planted strata: {float(ari.group(1)):.3f}")
