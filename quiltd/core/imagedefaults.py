"""An image's config (OCI or docker) as the defaults of the containers made from it.

What the client gives wins, as with docker and podman:

- the command given at create replaces the image's Cmd and keeps its
  Entrypoint: an image with Entrypoint ["python3"] run with ["-c", "..."]
  runs python3 -c ...; no command runs Entrypoint + Cmd;
- the entrypoint option replaces the image's Entrypoint, and then the
  image's Cmd is not used (it was written for the Entrypoint it replaces);
  an empty list clears the Entrypoint, and the command alone runs (the
  image's Cmd when none is given).

workdir and user given as options replace the image's. Env is merged by
name, the client's entries over the image's.
"""

from __future__ import annotations

from dataclasses import replace

from quiltd.core import options
from quiltd.core.requests import CreateOptions
from quiltd.errors import InvalidArgument
from quiltd.model import ContainerSpec, ImageConfig


def command_line(config: ImageConfig, command: list[str], request: CreateOptions) -> list[str]:
    """The argv a container runs: Entrypoint and Cmd, the image's unless the client gave its own."""
    if request.entrypoint is None:
        return [*config.entrypoint, *(command or config.cmd)]
    if request.entrypoint:
        return [*request.entrypoint, *command]
    return list(command or config.cmd)


def apply(config: ImageConfig, command: list[str], request: CreateOptions, spec: ContainerSpec
          ) -> tuple[tuple[str, ...], ContainerSpec]:
    """The container's argv and spec once the image's defaults fill what the client left out."""
    argv = command_line(config, command, request)
    if not argv:
        raise InvalidArgument("the command is empty and the image gives no Entrypoint or Cmd: "
                              "give at least the program to run")
    if not argv[0]:
        raise InvalidArgument("the program to run (the first word of Entrypoint and command) is empty")
    merged: dict[str, str] = {}
    for item in (*config.env, *request.env):
        merged[item.split("=", 1)[0]] = item
    env = list(merged.values())
    if "PATH" not in merged:
        env = [options.DEFAULT_PATH, *env]
    return options.check_command(argv), replace(
        spec,
        env=tuple(env),
        workdir=spec.workdir if "workdir" in request.given else (config.workdir or spec.workdir),
        user=spec.user if "user" in request.given else config.user,
    )
