"""Writes a benchmark's rows with the machine and command to benchmarks/results/."""
from __future__ import annotations

import datetime
import json
import os
import sys

from lsprune.bench import format_table, machine_info

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def record(name: str, title: str, sections: list[tuple[str, list[dict], list[str]]], notes: str = "") -> str:
    """sections: (heading, rows, columns). Writes results/<name>.json and .md; returns the markdown."""
    os.makedirs(RESULTS, exist_ok=True)
    info = machine_info()
    cmd = "python " + " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])
    when = datetime.datetime.now().isoformat(timespec="seconds")
    with open(os.path.join(RESULTS, name + ".json"), "w") as f:
        json.dump({"title": title, "command": cmd, "date": when, "machine": info,
                   "sections": {h: rows for h, rows, _ in sections}, "notes": notes}, f, indent=1)
    md = [f"# {title}", "", f"- command: `{cmd}`", f"- date: {when}",
          "- machine: " + ", ".join(f"{k}={v}" for k, v in info.items()), ""]
    for heading, rows, cols in sections:
        md += [f"## {heading}", "", format_table(rows, cols), ""]
    if notes:
        md += ["## Notes", "", notes, ""]
    text = "\n".join(md)
    with open(os.path.join(RESULTS, name + ".md"), "w") as f:
        f.write(text)
    return text
