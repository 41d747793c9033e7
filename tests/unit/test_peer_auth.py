"""The server half of SASL EXTERNAL on quiltd's socket."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

from quiltd.bus.peer import AuthFailed, _claims, authenticate, peer_credentials


def hexuid(uid: int) -> str:
    return str(uid).encode().hex()


async def exchange(client_sends: bytes, uid: int) -> tuple[bool | Exception, bytes, bytes]:
    server, client = socket.socketpair()
    server.setblocking(False)
    client.sendall(client_sends)
    client.shutdown(socket.SHUT_WR)
    try:
        result: bool | Exception = await asyncio.wait_for(authenticate(server, uid, "ab" * 16), 5)
    except AuthFailed as e:
        result = e
    rest = server.recv(4096)  # what authenticate left unread: the first D-Bus message
    client.settimeout(1)
    answers = client.recv(4096)
    server.close()
    client.close()
    return result, answers, rest


def test_pipelined_client_keeps_its_first_message() -> None:
    sent = f"\0AUTH EXTERNAL {hexuid(1000)}\r\nNEGOTIATE_UNIX_FD\r\nBEGIN\r\nl\x01\x00\x01MESSAGE".encode()
    result, answers, rest = asyncio.run(exchange(sent, 1000))
    assert result is True
    assert answers == b"OK " + b"ab" * 16 + b"\r\nAGREE_UNIX_FD\r\n"
    assert rest == b"l\x01\x00\x01MESSAGE"


def test_empty_initial_response_gets_a_data_challenge() -> None:
    result, answers, _ = asyncio.run(exchange(b"\0AUTH EXTERNAL\r\nDATA\r\nBEGIN\r\n", 0))
    assert result is False
    assert answers.startswith(b"DATA\r\nOK ")


def test_a_claimed_uid_other_than_the_kernels_is_rejected() -> None:
    sent = f"\0AUTH EXTERNAL {hexuid(0)}\r\nBEGIN\r\n".encode()
    result, answers, _ = asyncio.run(exchange(sent, 1000))
    assert isinstance(result, AuthFailed)
    assert answers.startswith(b"REJECTED EXTERNAL\r\nERROR")


def test_other_mechanisms_are_rejected() -> None:
    result, answers, _ = asyncio.run(exchange(b"\0AUTH ANONYMOUS\r\n", 0))
    assert isinstance(result, AuthFailed)
    assert answers == b"REJECTED EXTERNAL\r\n"


def test_peer_credentials_come_from_the_kernel() -> None:
    a, b = socket.socketpair()
    with a, b:
        creds = peer_credentials(a)
    assert creds.uid == os.getuid()
    assert os.getgid() in creds.gids


@pytest.mark.parametrize(("claim", "accepted"), [("3130", True), ("", True), ("3131", False), ("zz", False)])
def test_claims_for_uid_10(claim: str, accepted: bool) -> None:
    assert _claims(claim, 10) is accepted
