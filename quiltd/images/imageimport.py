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

from quiltd.errors import InvalidArgument
from quiltd.images import extract, ociimage
from quiltd.images.layerstore import MAX_STACKED, LayerStore
from quiltd.model import ImageConfig

PROGRESS_INTERVAL = 0.1  # seconds between ImportProgress signals of one import

ProgressCallback = Callable[[int, int], None]  # (bytes read, bytes in total)


@dataclass(frozen=True)
class Imported:
    image_id: str
    size_bytes: int
    config: ImageConfig
    kind: str  # "rootfs", "oci" or "docker"
    skipped_devices: int = 0  # device node members not created (docs/images.md)
    # Set when the layers went to the layer store instead of dest (which then
    # is not made): base first. Their pins are the caller's to release.
    layers: tuple[ociimage.StoredLayer, ...] = ()
    pinned: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImportOptions:
    limits: extract.ImageLimits
    ref: str | None = None  # which image of an archive holding several


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


@dataclass(frozen=True)
class Layers:
    """Where OCI and docker layers are kept once each, and the sizes of those on record."""

    store: LayerStore
    known_sizes: Mapping[str, int]
    committed: list[str]  # filled with the layers the import stored, for cleaning up after a failure


def run(fd: int, label: str, dest: Path, limits: extract.ImageLimits, progress: ProgressCallback,
        ref: str | None = None, opener: ociimage.Opener = ociimage.plain_opener,
        layers: Layers | None = None) -> Imported:
    """Imports the open file or directory fd into the new directory dest; closes fd.

    On any error dest is gone again. The source is read from its descriptor
    only, never looked up again by name; files inside a layout directory are
    opened with `opener`. `ref` picks an image of an OCI layout or docker
    archive holding several. label names the source in messages. With
    `layers`, an OCI or docker image of at most layerstore.MAX_STACKED
    layers goes to the layer store instead, and dest is not made.
    """
    try:
        return _run(fd, label, dest, limits, progress, ref, opener, layers)
    finally:
        os.close(fd)


def _run(fd: int, label: str, dest: Path, limits: extract.ImageLimits, progress: ProgressCallback,
         ref: str | None, opener: ociimage.Opener, layers: Layers | None) -> Imported:
    throttled = _Throttle(progress)
    image_source = ociimage.open_image_source(os.dup(fd), label, opener)
    if image_source is not None:
        kind = "docker" if image_source.docker else "oci"
        try:
            stack = layers is not None and ociimage.layer_count(image_source, ref) <= MAX_STACKED
        except BaseException:
            image_source.close()
            raise
        if layers is not None and stack:
            stored = ociimage.import_layers(image_source, layers.store, limits, throttled, ref,
                                            layers.known_sizes, layers.committed)
            throttled.flush()
            return Imported(stored.image_id, sum(s.size_bytes for s in stored.layers), stored.config, kind,
                            stored.skipped_devices, stored.layers, stored.pinned)
        got = ociimage.import_image(image_source, dest, limits, throttled, ref)
        throttled.flush()
        return Imported(got.image_id, got.size_bytes, got.config, kind, got.skipped_devices)
    if ref is not None:
        raise InvalidArgument(f"{label} is a rootfs tarball, which holds one image and no names; "
                              "the option ref is for OCI layouts and docker save archives")
    total = os.fstat(fd).st_size
    done = 0

    def counted(n: int) -> None:
        nonlocal done
        done += n
        throttled(done, total)

    extracted = extract.extract_rootfs_fd(fd, label, dest, limits, counted)
    throttled.flush()
    return Imported(extracted.image_id, extracted.size_bytes, ImageConfig(), "rootfs",
                    extracted.skipped_devices)
