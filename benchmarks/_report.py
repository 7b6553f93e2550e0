"""The end of every benchmark script: the result with the machine and the commit, printed and saved."""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def report(result: dict, out: str | None) -> None:
    """Add the machine and the commit to `result`, print it as JSON, and write it to `out` if given."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    result = {**result, "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
              "commit": commit.stdout.strip()}
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        Path(out).write_text(text + "\n")
