"""libnftables in the daemon: a script nft refuses comes back as nft's own error text."""

from __future__ import annotations

import pytest

from quiltd.errors import Internal
from quiltd.net import firewall, nftlib


def test_a_script_nft_cannot_parse_is_refused_with_its_reason() -> None:
    nft = nftlib.library()
    if nft is None:
        pytest.skip("libnftables is not installed")
    # A syntax error is found before anything is sent to the kernel.
    error = nft.run("table inet quilt-test { chain c { this is not nft; }; }\n")
    assert error is not None and "syntax error" in error
    # The context is usable again, and its error buffer starts empty.
    again = nft.run("not a command\n")
    assert again is not None and "syntax error" in again and "this is not nft" not in again
    with pytest.raises(Internal, match=r"nft failed: .*syntax error"):
        firewall.load("not a command\n")
