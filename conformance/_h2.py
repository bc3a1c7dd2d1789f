"""One unary gRPC call spoken as raw HTTP/2, with a grpc-timeout of our choosing and no deadline of our own.

A gRPC library enforces its caller's deadline itself: it gives up when the deadline passes, often
before the server's deadline (which runs from when the call arrives, and which servers built on
grpc core round up to the millisecond), so a call the client saw expire may well have committed
in time. The deadline check needs the server's own verdict instead: did it answer with a response
message, or not (a status, or a reset stream, once its deadline had passed)? This module sends the
call, waits for the stream to end, and reports just that. Cleartext HTTP/2 (h2c) only, as the kit's
other calls; header values go as HPACK literals without Huffman coding, and the response's headers
are never decoded, only framed.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Sequence

__all__ = ["MAX_REQUEST_BYTES", "RawCallFailed", "answered_with_message"]

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_DATA, _HEADERS, _RST_STREAM, _SETTINGS, _PING, _GOAWAY = 0x0, 0x1, 0x3, 0x4, 0x6, 0x7
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_STREAM = 1
# The frame size and flow-control window every HTTP/2 peer starts with: a request that fits them
# needs no negotiation, and saga requests are far smaller.
_MAX_FRAME = 16_384
MAX_REQUEST_BYTES = 65_535 - 5


class RawCallFailed(Exception):
    """The connection failed or the stream did not end in time: no verdict."""


def _integer(value: int) -> bytes:
    """An HPACK integer with a 7-bit prefix (RFC 7541 5.1), the first bit 0 (no Huffman coding)."""
    if value < 127:
        return bytes([value])
    encoded = [127]
    value -= 127
    while value >= 128:
        encoded.append((value & 127) | 128)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _literal(name: str, value: str) -> bytes:
    """A literal header field without indexing, with a new name (RFC 7541 6.2.2)."""
    name_bytes, value_bytes = name.encode("ascii"), value.encode("ascii")
    return b"\x00" + _integer(len(name_bytes)) + name_bytes + _integer(len(value_bytes)) + value_bytes


def _frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def answered_with_message(
    address: str,
    path: str,
    request: bytes,
    metadata: Sequence[tuple[str, str]],
    grpc_timeout: str,
    wait: float,
) -> bool:
    """Send one unary call with grpc-timeout and wait (at most wait seconds) for its stream to end.

    True when the server sent a response message, False when it ended the call without one (a
    status, or RST_STREAM). Raises RawCallFailed when there is no verdict, ValueError for a request
    over MAX_REQUEST_BYTES.
    """
    if len(request) > MAX_REQUEST_BYTES:
        raise ValueError(f"the request is {len(request)} bytes; the raw call sends at most {MAX_REQUEST_BYTES}")
    host, _, port = address.rpartition(":")
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", address),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", grpc_timeout),
        *metadata,
    ]
    block = b"".join(_literal(name, value) for name, value in headers)
    message = b"\x00" + struct.pack(">I", len(request)) + request
    chunks = [message[start : start + _MAX_FRAME] for start in range(0, len(message), _MAX_FRAME)]
    data = b"".join(
        _frame(_DATA, _END_STREAM if index == len(chunks) - 1 else 0, _STREAM, chunk)
        for index, chunk in enumerate(chunks)
    )
    deadline = time.monotonic() + wait
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=wait) as connection:
            connection.sendall(
                _PREFACE + _frame(_SETTINGS, 0, 0) + _frame(_HEADERS, _END_HEADERS, _STREAM, block) + data
            )
            return _await_end(connection, deadline)
    except OSError as error:
        raise RawCallFailed(f"raw HTTP/2 call to {address} failed: {error}") from None


def _await_end(connection: socket.socket, deadline: float) -> bool:
    buffer = b""
    got_message = False
    while True:
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, flags = buffer[3], buffer[4]
            stream = int.from_bytes(buffer[5:9], "big") & 0x7FFF_FFFF
            payload, buffer = buffer[9 : 9 + length], buffer[9 + length :]
            if kind == _SETTINGS and not flags & _ACK:
                connection.sendall(_frame(_SETTINGS, _ACK, 0))
            elif kind == _PING and not flags & _ACK:
                connection.sendall(_frame(_PING, _ACK, 0, payload))
            elif kind == _GOAWAY:
                return got_message
            elif stream == _STREAM:
                if kind == _DATA and payload:
                    got_message = True
                if kind == _RST_STREAM or (kind in (_DATA, _HEADERS) and flags & _END_STREAM):
                    return got_message
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise RawCallFailed("the stream did not end in time")
        connection.settimeout(remaining)
        chunk = connection.recv(65_536)
        if not chunk:
            return got_message
        buffer += chunk
