"""A small asyncio HTTP/1.1 client for load generation: POST a JSON body, read the response
(Content-Length or chunked), and yield server-sent events as they arrive.

A load generator on a 2-core machine shares the CPU with the server it measures, so it stays
lean: no HTTP library, no per-chunk object models.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from urllib.parse import urlsplit


class HTTPStatusError(Exception):
    def __init__(self, status: int, body: str, headers: dict[str, str] | None = None):
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status
        self.body = body
        self.headers = headers or {}  # lower-case names


@dataclass
class Endpoint:
    host: str
    port: int
    base_path: str  # e.g. "/v1"

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"--base-url must look like http://HOST:PORT[/v1], got {url!r}")
        return cls(parts.hostname, parts.port or 80, parts.path.rstrip("/"))


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the server closed the connection")
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        key, _, value = line.decode("latin-1").partition(":")
        headers[key.strip().lower()] = value.strip()
    return status, headers


async def _body_chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while data := await reader.read(65536):
            yield data


async def post_json(
    endpoint: Endpoint,
    path: str,
    body: dict,
    headers: dict[str, str] | None = None,
    stream: bool = False,
    response_headers: dict[str, str] | None = None,
) -> AsyncIterator[dict | str]:
    """POST and yield either the parsed JSON response (once) or, with stream=True, each SSE event's
    data: a dict, or the string "[DONE]". response_headers, if given, receives the response's
    headers (lower-case names) before the first item."""
    reader, writer = await asyncio.open_connection(endpoint.host, endpoint.port)
    try:
        payload = json.dumps(body).encode()
        head = [
            f"POST {endpoint.base_path}{path} HTTP/1.1",
            f"Host: {endpoint.host}:{endpoint.port}",
            "Content-Type: application/json",
            f"Content-Length: {len(payload)}",
            "Connection: close",
        ]
        head += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + payload)
        await writer.drain()
        status, resp_headers = await _read_head(reader)
        if response_headers is not None:
            response_headers.update(resp_headers)
        if status != 200 or not stream:
            data = b"".join([c async for c in _body_chunks(reader, resp_headers)])
            if status != 200:
                raise HTTPStatusError(status, data.decode(errors="replace"), resp_headers)
            yield json.loads(data)
            return
        buffer = b""
        async for chunk in _body_chunks(reader, resp_headers):
            buffer += chunk
            while b"\n\n" in buffer:
                event, buffer = buffer.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        yield "[DONE]" if data == b"[DONE]" else json.loads(data)
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class KeepAlive:
    """One kept-alive HTTP/1.1 connection for non-streamed JSON requests, as pooled clients
    (httpx, OpenAI's) send them: no TCP set-up per request. Reconnects once if the server closed it."""

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post_json(self, path: str, body: dict) -> dict:
        for attempt in range(2):
            if self._conn is None:
                self._conn = await asyncio.open_connection(self.endpoint.host, self.endpoint.port)
            reader, writer = self._conn
            payload = json.dumps(body).encode()
            head = (
                f"POST {self.endpoint.base_path}{path} HTTP/1.1\r\nHost: {self.endpoint.host}:{self.endpoint.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
            )
            try:
                writer.write(head.encode() + payload)
                await writer.drain()
                status, headers = await _read_head(reader)
            except (ConnectionError, OSError):
                await self.close()
                if attempt:
                    raise
                continue
            data = b"".join([c async for c in _body_chunks(reader, headers)])
            if headers.get("connection", "").lower() == "close":
                await self.close()
            if status != 200:
                raise HTTPStatusError(status, data.decode(errors="replace"), headers)
            return json.loads(data)
        raise ConnectionError("unreachable")

    async def close(self) -> None:
        if self._conn is not None:
            _, writer = self._conn
            self._conn = None
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, OSError):
                pass
