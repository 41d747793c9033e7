"""quiltctl's output: tables, sizes, JSON, and a progress bar for a terminal."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

FORMATS = ("table", "json")


def add_format(p: Any, choices: tuple[str, ...] = FORMATS) -> None:
    """--format (table or json, and any more the verb has) and --json, as podman takes them."""
    p.add_argument("--format", choices=choices, default="table", help="output format (default table)")
    p.add_argument("--json", action="store_const", const="json", dest="format", help="as --format json")


def table(header: list[str], rows: list[list[str]], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)).rstrip(), file=out)


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def print_json(value: Any, lines: bool = False) -> None:
    """Indented; lines: one compact document per line (JSON Lines), for a stream."""
    if lines:
        print(json.dumps(value, sort_keys=True, separators=(",", ":")), flush=True)
    else:
        print(json.dumps(value, indent=2, sort_keys=True), flush=True)


class Progress:
    """A one-line bar on stderr while it is a terminal; nothing when it is not (a pipe, a file)."""

    WIDTH = 30
    EVERY = 0.1  # seconds between redraws

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._label = label
        self.shown = self._stream.isatty()
        self._drawn = 0.0

    def update(self, done: int, total: int) -> None:
        now = time.monotonic()
        if not self.shown or (now - self._drawn < self.EVERY and done < total):
            return
        self._drawn = now
        self._stream.write("\r" + bar(self._label, done, total, self.WIDTH))
        self._stream.flush()

    def finish(self) -> None:
        if self.shown and self._drawn:
            self._stream.write("\n")
            self._stream.flush()


def bar(label: str, done: int, total: int, width: int) -> str:
    """`label [#####-----]  50%  1.0 MiB / 2.0 MiB`; an unknown total shows only the bytes."""
    if total <= 0:
        return f"{label} {size(done)}"
    part = min(done, total) / total
    filled = int(part * width)
    shown = f"[{'#' * filled}{'-' * (width - filled)}]"
    return f"{label} {shown} {part * 100:3.0f}%  {size(done)} / {size(total)}"
