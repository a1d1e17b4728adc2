"""Echo function: answers POST /echo with the request body, for walk-throughs, tests and benchmarks.

Runs under the local backend (`python examples/echo/server.py`), which sets HOST and PORT.
Optional knobs in a JSON body, so one function can show every invocation behaviour:
  {"delaySeconds": 2}            answer after a delay (202 + polling when longer than NVCF-POLL-SECONDS)
  {"status": 500, "error": "x"}  answer with that status and {"error": "x"}
  {"status": 422, "errorBody": {...}}  answer with that status and that JSON body
  {"stream": 5}                  with Accept: text/event-stream, send 5 events, 0.2 s apart
Environment: ECHO_DELAY_MS adds a fixed delay to every request (the benchmark's "20 ms function");
ECHO_START_SECONDS delays start-up (a model that takes a while to load).
"""

import asyncio
import json
import os
import time

from aiohttp import web

FIXED_DELAY = float(os.environ.get("ECHO_DELAY_MS", "0")) / 1000.0


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def echo(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    options = {}
    if body[:1] == b"{":
        try:
            options = json.loads(body)
        except ValueError:
            options = {}
    if not isinstance(options, dict):
        options = {}
    delay = FIXED_DELAY + float(options.get("delaySeconds", 0) or 0)
    if delay:
        await asyncio.sleep(delay)
    if "status" in options and "errorBody" in options:
        return web.json_response(options["errorBody"], status=int(options["status"]))
    if "status" in options:
        return web.json_response(
            {"error": options.get("error", "requested error")}, status=int(options["status"])
        )
    events = int(options.get("stream", 0) or 0)
    if events and "text/event-stream" in request.headers.get("Accept", ""):
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        for n in range(events):
            await response.write(f"id: {n}\ndata: {json.dumps({'event': n})}\n\n".encode())
            await asyncio.sleep(float(options.get("intervalSeconds", 0.2)))
        await response.write_eof()
        return response
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    reqid = request.headers.get("NVCF-REQID")
    if reqid:
        headers["X-Echo-Reqid"] = reqid
    return web.Response(body=body, headers=headers)


def main() -> None:
    time.sleep(float(os.environ.get("ECHO_START_SECONDS", "0")))
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_get("/health", health)
    app.router.add_get("/v2/health/ready", health)
    app.router.add_post("/echo", echo)
    web.run_app(
        app, host=os.environ.get("HOST", "127.0.0.1"), port=int(os.environ.get("PORT", "8000")), print=None
    )


if __name__ == "__main__":
    main()
