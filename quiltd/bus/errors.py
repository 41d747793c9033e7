"""Turns core exceptions into named D-Bus errors at the edge of every method."""

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_next.errors import DBusError

from quiltd.errors import Internal, QuiltError

log = logging.getLogger("quiltd")
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def bus_errors(fn: F) -> F:
    """Wraps a bus method so no library-named error reaches a client.

    functools.wraps keeps the D-Bus signature annotations visible to dbus-next.
    """

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except QuiltError as e:
            raise DBusError(e.dbus_name, e.message) from e
        except DBusError:
            raise
        except Exception as e:
            log.exception("internal error in %s", fn.__name__)
            raise DBusError(Internal.dbus_name, f"internal error: {type(e).__name__}: {e}") from e

    return wrapper  # type: ignore[return-value]
