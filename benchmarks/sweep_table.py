"""The results table both sweeps keep (benchmarks/sweep.py, benchmarks/finetune_sweep.py): one row per
variant in a JSON file with its Markdown beside it, both rewritten atomically after every variant, so an
interrupted sweep goes on where it stopped and a finished variant is never run twice."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from igpt.files import write_json_atomic, write_text_atomic
from igpt.hardware import cpu_name


class SweepTable:
    """The rows of one budget's table at `path` (.json; the .md beside it), read back if it exists; rows of
    another budget are dropped, since their figures are not comparable."""

    def __init__(
        self, path: Path, minutes: float, markdown: Callable[[list[dict[str, Any]], str], str]
    ) -> None:
        self.path, self.minutes, self.markdown = path, minutes, markdown
        rows = json.loads(path.read_text())["rows"] if path.is_file() else []
        self.rows: list[dict[str, Any]] = [r for r in rows if r.get("minutes") == minutes]
        self.cpu = cpu_name()

    def skip(self, variant: str) -> bool:
        """Whether to skip `variant` because its row is here already; prints that it is skipped."""
        if any(r["variant"] == variant for r in self.rows):
            print(f"{variant}: done earlier; skipped")
            return True
        return False

    def add(self, row: dict[str, Any]) -> None:
        """Append a finished variant's row, print it, and rewrite both files."""
        self.rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "history"}), flush=True)
        write_json_atomic(self.path, {"cpu": self.cpu, "minutes": self.minutes, "rows": self.rows})
        write_text_atomic(self.path.with_suffix(".md"), self.text())

    def text(self) -> str:
        """The table as Markdown."""
        return self.markdown(self.rows, self.cpu)
