"""The administrator's settings: /etc/quilt/quiltd.conf, read once at daemon start.

Only what widens what members of group quilt may do lives here, so a
missing file is the safe default: members may bind no host path and may not
use the `host` image. The format is INI:

    [members]
    mount_roots = /srv/agents /data/shared
    host_image = yes

Anything unknown or malformed stops the daemon with a message naming it: a
mistyped key in a security setting must not be ignored silently.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass
from pathlib import Path

PATH = Path("/etc/quilt/quiltd.conf")
SECTION = "members"
_BOOLEANS = {"yes": True, "true": True, "1": True, "no": False, "false": False, "0": False}


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Config:
    # Host directories members may bind from (`mounts`), with anything below
    # them; absolute, normalised, without symlink resolution. Empty: none.
    member_mount_roots: tuple[str, ...] = ()
    member_host_image: bool = False  # whether members may create containers of the `host` image


def load(path: Path = PATH) -> Config:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, where: str = str(PATH)) -> Config:
    parser = configparser.ConfigParser(interpolation=None, empty_lines_in_values=False)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    try:
        parser.read_string(text, source=where)
    except configparser.Error as e:
        raise ConfigError(f"{where}: {e.message}") from None
    unknown_sections = sorted(set(parser.sections()) - {SECTION})
    if unknown_sections:
        raise ConfigError(f"{where}: unknown section(s) {', '.join(unknown_sections)}; "
                          f"the only section is [{SECTION}]")
    if not parser.has_section(SECTION):
        return Config()
    values = dict(parser.items(SECTION, raw=True))
    unknown = sorted(set(values) - {"mount_roots", "host_image"})
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} in [{SECTION}]; "
                          "known: mount_roots, host_image")
    return Config(_roots(values.get("mount_roots", ""), where),
                  _boolean(values.get("host_image", "no"), "host_image", where))


def _roots(value: str, where: str) -> tuple[str, ...]:
    roots = []
    for root in value.split():
        normal = os.path.normpath(root)
        if not root.startswith("/") or normal == "/":
            raise ConfigError(f"{where}: mount_roots: {root!r} must be an absolute path other than /")
        roots.append(normal)
    return tuple(roots)


def _boolean(value: str, key: str, where: str) -> bool:
    try:
        return _BOOLEANS[value.strip().lower()]
    except KeyError:
        raise ConfigError(f"{where}: {key} must be yes or no, got {value!r}") from None
