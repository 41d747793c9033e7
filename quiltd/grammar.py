"""The syntax of what users write: names, environment entries and users.

Shared by the checks of a client's options and of an image's config, which
must accept and refuse the same strings.
"""

from __future__ import annotations

import re

# \Z, not $: $ also matches before a final newline, so "web\n" would pass
# as a second name next to "web" (and carry the newline into hosts files).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,62}\Z")
IMAGE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}\Z")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(:[A-Za-z0-9_][A-Za-z0-9_.-]*)?\Z")
