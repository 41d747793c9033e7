"""One ImportImage, run in a worker thread: pick the format, extract, report progress.

Progress is reported through a callback at most every PROGRESS_INTERVAL
seconds, from the worker thread; the caller hands it to its event loop.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from quiltd import images, ociimage
from quiltd.errors import InvalidArgument
from quiltd.model import ImageConfig

PROGRESS_INTERVAL = 0.1  # seconds between ImportProgress signals of one import

ProgressCallback = Callable[[int, int], None]  # (bytes read, bytes in total)


@dataclass(frozen=True)
class Imported:
    image_id: str
    size_bytes: int
    config: ImageConfig
    kind: str  # "rootfs", "oci" or "docker"


def parse_options(opts: Mapping[str, object]) -> images.ImageLimits:
    unknown = sorted(set(opts) - {"max_bytes"})
    if unknown:
        raise InvalidArgument(f"unknown option(s): {', '.join(unknown)}")
    max_bytes = opts.get("max_bytes", images.ImageLimits.max_bytes)
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or not 0 < max_bytes <= 1 << 44:
        raise InvalidArgument(f"option max_bytes must be an integer from 1 to 2^44, got {max_bytes!r}")
    return images.ImageLimits(max_bytes=max_bytes)


class _Throttle:
    def __init__(self, send: ProgressCallback) -> None:
        self._send = send
        self._last = 0.0
        self._latest = (0, 0)
        self._sent: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self._latest = (done, total)
        now = time.monotonic()
        if now - self._last >= PROGRESS_INTERVAL:
            self._last = now
            self._sent = self._latest
            self._send(done, total)

    def flush(self) -> None:
        """Sends where the import ended, unless that was the last report: at least one per import."""
        if self._sent != self._latest:
            self._sent = self._latest
            self._send(*self._latest)


def run(source: Path, dest: Path, limits: images.ImageLimits, progress: ProgressCallback) -> Imported:
    """Imports source into the new directory dest; on any error dest is gone again."""
    throttled = _Throttle(progress)
    image_source = ociimage.open_image_source(source)
    if image_source is not None:
        kind = "docker" if image_source.docker else "oci"
        got = ociimage.import_image(image_source, dest, limits, throttled)
        throttled.flush()
        return Imported(got.image_id, got.size_bytes, got.config, kind)
    total = _size(source)
    done = 0

    def counted(n: int) -> None:
        nonlocal done
        done += n
        throttled(done, total)

    extracted = images.extract_rootfs_tarball(source, dest, limits, counted)
    throttled.flush()
    return Imported(extracted.image_id, extracted.size_bytes, ImageConfig(), "rootfs")


def _size(source: Path) -> int:
    try:
        return os.stat(source).st_size
    except OSError:
        return 0  # the extraction names the problem
