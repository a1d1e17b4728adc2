"""The API's HTTP/1.1 protocol: uvicorn's httptools protocol with bounds on the request head.

uvicorn bounds nothing about headers with httptools: an 8 MiB header was accepted and buffered. This
subclass counts the bytes of the request head as they arrive and the header lines as they are parsed, and
answers 431 (problem details) and closes the connection past either bound, before the request reaches
the app. It is written here rather than switching to h11 (which has a size bound) because h11 costs the
gateway measurably more CPU per request (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from api.problems import PROBLEM_CONTENT_TYPE, problem_body

MAX_HEAD_BYTES = 64 * 1024
"""Largest request line plus headers accepted."""
MAX_HEADER_COUNT = 128
"""Most header lines accepted in one request."""
LINGER_SECONDS = 1.0
"""How long a refused connection still reads (and drops) what the client sends before it is closed."""


class _HeadTooLarge(Exception):
    pass


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing request heads over `MAX_HEAD_BYTES` or `MAX_HEADER_COUNT`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_bytes = 0
        self._header_count = 0
        self._reading_head = True
        self._too_many = False
        self._refused = False

    def data_received(self, data: bytes) -> None:
        """Feed the parser; refuse the request once its unfinished head is over the bound."""
        if self._refused:
            return  # read and dropped, so the client gets to read the 431 before the connection closes
        if self._reading_head:
            self._head_bytes += len(data)
        super().data_received(data)
        if self._reading_head and self._head_bytes > MAX_HEAD_BYTES:
            self._refuse()

    def send_400_response(self, msg: str) -> None:
        """Answer a parse failure: a 431 when it was a bound of this class, uvicorn's 400 otherwise."""
        if self._too_many:
            self._refuse()
        else:
            super().send_400_response(msg)

    def on_message_begin(self) -> None:
        """Start counting a new request's head."""
        super().on_message_begin()
        self._header_count = 0
        self._reading_head = True

    def on_header(self, name: bytes, value: bytes) -> None:
        """Count header lines and their bytes."""
        self._header_count += 1
        if self._header_count > MAX_HEADER_COUNT or len(name) + len(value) > MAX_HEAD_BYTES:
            self._too_many = True
            raise _HeadTooLarge  # httptools stops parsing and uvicorn calls send_400_response
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        """The head is complete: what follows is the body, which the app bounds."""
        self._reading_head = False
        self._head_bytes = 0
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The next bytes on this connection start a new request head."""
        super().on_message_complete()
        self._reading_head = True
        self._head_bytes = 0

    def _refuse(self) -> None:
        if self._refused or self.transport.is_closing():
            return
        self._refused = True
        detail = (
            f"Request header fields too large (at most {MAX_HEADER_COUNT} fields, {MAX_HEAD_BYTES} bytes)"
        )
        body = json.dumps(problem_body(431, detail)).encode()
        self.transport.write(
            b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: %s\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (PROBLEM_CONTENT_TYPE.encode(), len(body), body)
        )
        # Closing at once while the client still sends would reset the connection and lose the answer:
        # drop what still arrives for a moment, then close.
        asyncio.get_running_loop().call_later(LINGER_SECONDS, self.transport.close)
