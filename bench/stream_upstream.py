"""The streaming upstream of `make bench`: GET /big?size=N streams N zero bytes; POST /upload
counts the bytes it receives and answers the count. Run: python bench/stream_upstream.py PORT"""

from __future__ import annotations

import sys

import uvloop
from aiohttp import web

_CHUNK = b"\0" * (1 << 20)


async def big(request: web.Request) -> web.StreamResponse:
    size = int(request.query["size"])
    response = web.StreamResponse(headers={"Content-Length": str(size)})
    await response.prepare(request)
    sent = 0
    while sent < size:
        piece = _CHUNK[: min(len(_CHUNK), size - sent)]
        await response.write(piece)
        sent += len(piece)
    await response.write_eof()
    return response


async def upload(request: web.Request) -> web.Response:
    received = 0
    async for chunk in request.content.iter_any():
        received += len(chunk)
    return web.Response(text=str(received))


def main() -> None:
    app = web.Application(client_max_size=1 << 40)
    app.router.add_get("/big", big)
    app.router.add_post("/upload", upload)
    uvloop.install()
    web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)


if __name__ == "__main__":
    main()
