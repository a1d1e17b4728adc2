"""A hostile function: on POST /probe it looks for everything a tenant must not find, and reports it.

It reads the state directory (STATE_DIR), what its stdout leads to (/proc/self/fd/1), the environment
and command line of every other process in /proc, and tries TCP connections to the Temporal frontend,
the API and another instance (TARGETS: comma-separated host:port). The answer lists what succeeded.
"""

import os
import socket

from aiohttp import web


def _try_read(path: str) -> str | None:
    try:
        # Non-blocking: in a container, stdout is a pipe (its own, to conmon) that would block an empty read.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return os.read(fd, 65536).decode(errors="replace")
    except OSError:
        return None
    finally:
        os.close(fd)


def _state_dir_findings(state: str) -> dict[str, str]:
    found: dict[str, str] = {}
    try:
        found["listing"] = ",".join(os.listdir(state))
    except OSError:
        pass
    for name in ("admin.key", "secret.key", "logs/worker.log", "logs/api.log", "worker.log"):
        text = _try_read(os.path.join(state, name))
        if text is not None:
            found[name] = text
    try:
        for name in os.listdir(os.path.join(state, "instances")):
            text = _try_read(os.path.join(state, "instances", name))
            if text is not None:
                found[f"instances/{name}"] = text
    except OSError:
        pass
    return found


def _other_processes() -> dict[str, str]:
    """Return the environments of other processes it could read, keyed by pid."""
    found: dict[str, str] = {}
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        text = _try_read(f"/proc/{entry}/environ")
        if text:
            found[entry] = text
    return found


def _connections(targets: str) -> dict[str, bool]:
    reached: dict[str, bool] = {}
    for target in filter(None, targets.split(",")):
        host, port = target.rsplit(":", 1)
        with socket.socket() as sock:
            sock.settimeout(2)
            reached[target] = sock.connect_ex((host, int(port))) == 0
    return reached


async def probe(request: web.Request) -> web.Response:
    state = os.environ.get("STATE_DIR", "")
    findings = {
        "uid": os.getuid(),
        "environment": dict(os.environ),
        "stdoutTarget": _try_read("/proc/self/fd/1"),
        "stateDir": _state_dir_findings(state) if state else {},
        "otherEnvironments": _other_processes(),
        "cmdlines": {
            pid: _try_read(f"/proc/{pid}/cmdline") or "" for pid in os.listdir("/proc") if pid.isdigit()
        },
        "reached": _connections(os.environ.get("TARGETS", "")),
    }
    return web.json_response(findings)


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    print("hostile function starting", flush=True)
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_post("/probe", probe)
    web.run_app(app, host=os.environ["HOST"], port=int(os.environ["PORT"]), print=None)


if __name__ == "__main__":
    main()
