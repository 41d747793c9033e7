"""nft scripts run through libnftables in the daemon itself, not by an nft process.

Every container start and removal changes the firewall's port pins, and an
`nft -f -` process costs about 2.9 ms of CPU (a fork, an exec, loading its
libraries), against about 0.1 ms for the same script handed to
libnftables, the library nft itself is a front end to (installed with it).
Scripts are parsed and committed the same way (one transaction per script),
so a failure still changes nothing.

One context, used under a lock: libnftables keeps state in it (its cache of
the ruleset) and does not promise that a context may be used by several
threads at once. None when the library cannot be loaded; the caller then
runs nft.
"""

from __future__ import annotations

import ctypes
import threading
from typing import Any


class Nft:
    def __init__(self, lib: Any) -> None:
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_get_output_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_output_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT
        if not self._ctx:
            raise OSError("nft_ctx_new failed")
        # Output and errors into buffers of the context, not our stdout and stderr.
        if lib.nft_ctx_buffer_output(self._ctx) or lib.nft_ctx_buffer_error(self._ctx):
            raise OSError("could not buffer libnftables' output")
        self._lock = threading.Lock()

    def run(self, script: str) -> str | None:
        """Runs the script as `nft -f -` would; None if it was committed, else nft's error text."""
        with self._lock:
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, script.encode())
            # Reading a buffer also empties it for the next script.
            self._lib.nft_ctx_get_output_buffer(self._ctx)
            error: bytes = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return None if rc == 0 else (error.decode(errors="replace").strip() or f"error {rc}")


_loaded: list[Nft | None] = []
_load_lock = threading.Lock()


def library() -> Nft | None:
    """The process's one Nft, made on first use; None where libnftables is missing."""
    with _load_lock:
        if not _loaded:
            try:
                _loaded.append(Nft(ctypes.CDLL("libnftables.so.1")))
            except (OSError, AttributeError):
                _loaded.append(None)
        return _loaded[0]
