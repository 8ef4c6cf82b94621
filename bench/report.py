"""The benchmarks' one output step: write the report as JSON (bench/results/ is git-ignored) and print it."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out: str | Path) -> int:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return 0
