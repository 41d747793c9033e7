"""An image's config (OCI or docker) as the defaults of the containers made from it.

What the client gives wins: a non-empty command is the whole argv (the
image's Entrypoint is not put in front of it), and workdir and user given as
options replace the image's. Env is merged by name, the client's entries over
the image's, as docker does.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from quiltd import options
from quiltd.errors import InvalidArgument
from quiltd.model import ContainerSpec, ImageConfig


def apply(config: ImageConfig, command: list[str], opts: Mapping[str, object], spec: ContainerSpec
          ) -> tuple[tuple[str, ...], ContainerSpec]:
    """The container's argv and spec once the image's defaults fill what the client left out."""
    argv = list(command) or [*config.entrypoint, *config.cmd]
    if not argv:
        raise InvalidArgument("the command is empty and the image gives no Entrypoint or Cmd: "
                              "give at least the program to run")
    given = opts.get("env", [])
    assert isinstance(given, list)  # checked by options.parse_create_options
    merged: dict[str, str] = {}
    for item in (*config.env, *given):
        merged[item.split("=", 1)[0]] = item
    env = list(merged.values())
    if "PATH" not in merged:
        env = [options.DEFAULT_PATH, *env]
    return options.check_command(argv), replace(
        spec,
        env=tuple(env),
        workdir=spec.workdir if "workdir" in opts else (config.workdir or spec.workdir),
        user=spec.user if "user" in opts else config.user,
    )
