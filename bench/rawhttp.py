"""A minimal HTTP/1.1 client for the load generator: one keep-alive connection, one
request at a time, ``Content-Length`` bodies (all ledgercore and the ceiling app send).

httpx costs about 1 ms of the generator's CPU per request here, as much as an empty
handler costs the server, so on two cores an httpx generator measures itself, not
the server. This client writes the request in one ``write`` and parses the answer's
status line and headers by hand: a few tens of microseconds.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit


class HttpError(Exception):
    """No complete answer on the connection (closed, reset, malformed, timed out)."""


class Response:
    __slots__ = ("status_code", "headers", "content")

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes):
        self.status_code, self.headers, self.content = status_code, headers, content

    def json(self) -> Any:
        return json.loads(self.content)


class Client:
    def __init__(self, base_url: str, timeout: float = 60.0):
        url = urlsplit(base_url)
        self.host, self.port = url.hostname or "127.0.0.1", url.port or 80
        self.timeout = timeout
        self._host_header = f"Host: {self.host}:{self.port}\r\n"
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def post(self, path: str, content: bytes | None = None,
                   headers: dict[str, str] | None = None) -> Response:
        return await self.request("POST", path, content or b"", headers or {})

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Response:
        return await self.request("GET", path, None, headers or {})

    async def request(self, method: str, path: str, content: bytes | None,
                      headers: dict[str, str]) -> Response:
        try:
            return await asyncio.wait_for(self._exchange(method, path, content, headers),
                                          self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                asyncio.TimeoutError, ValueError) as error:
            await self.aclose()
            raise HttpError(type(error).__name__) from error

    async def _exchange(self, method: str, path: str, content: bytes | None,
                        headers: dict[str, str]) -> Response:
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        assert self._reader is not None
        head = [f"{method} {path} HTTP/1.1\r\n", self._host_header]
        head.extend(f"{name}: {value}\r\n" for name, value in headers.items())
        if content is not None:
            head.append(f"Content-Length: {len(content)}\r\n")
        head.append("\r\n")
        self._writer.write("".join(head).encode("latin-1") + (content or b""))
        raw = await self._reader.readuntil(b"\r\n\r\n")
        lines = raw[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        answer: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            answer[name.strip().lower()] = value.strip()
        if "content-length" not in answer:
            raise ValueError("an answer without Content-Length")
        body = await self._reader.readexactly(int(answer["content-length"]))
        if answer.get("connection", "").lower() == "close":
            await self.aclose()
        return Response(status, answer, body)

    async def aclose(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
