"""A controllable upstream for `make soak`: answers with its name, or misbehaves on demand.

    POST /__mode  {"mode": "ok" | "errors" | "hang" | "reset" | "slow", "rate": 0.0-1.0}

`errors` answers 500 to a `rate` share of requests, `hang` never answers them, `reset` closes
the connection after half a body, `slow` waits 300 ms first. Everything else answers 200 with
the upstream's name. Run: python bench/fault_upstream.py PORT NAME
"""

from __future__ import annotations

import asyncio
import random
import sys

import uvloop
from aiohttp import web


def make_app(name: str) -> web.Application:
    state = {"mode": "ok", "rate": 0.0}

    async def set_mode(request: web.Request) -> web.Response:
        body = await request.json()
        state["mode"] = str(body.get("mode", "ok"))
        state["rate"] = float(body.get("rate", 1.0))
        return web.json_response(state)

    async def answer(request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(text="ok")
        mode = state["mode"]
        if mode != "ok" and random.random() < float(state["rate"]):
            if mode == "errors":
                return web.Response(status=500, text=f"{name} failing\n")
            if mode == "hang":
                await asyncio.sleep(3600)
            if mode == "slow":
                await asyncio.sleep(0.3)
            if mode == "reset":
                response = web.StreamResponse(headers={"Content-Length": "100"})
                await response.prepare(request)
                await response.write(b"x" * 50)
                assert request.transport is not None
                request.transport.close()
                return response
        return web.Response(text=f"{name}\n")

    app = web.Application()
    app.router.add_post("/__mode", set_mode)
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(port: int, name: str) -> None:
    runner = web.AppRunner(make_app(name), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), sys.argv[2]))
