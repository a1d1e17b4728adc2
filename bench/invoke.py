"""Invocation gateway benchmark: the gateway against direct calls to the same instance, in one run.

    python bench/invoke.py [--rounds 2] [--duration 5] [--json out.json]

What runs, each in its own process (nothing is installed, nothing outside the repository is needed):

* two instances of the echo example (examples/echo/server.py): one plain, one with ECHO_DELAY_MS=20;
* the gateway (api.gateway.Gateway) served by uvicorn with uvloop and the API's httptools protocol
  (`api/http_limits.py`), one worker. Its route
  table is fed directly with route dicts shaped like `workflows.routes.route_memo` output, and its
  `authenticate` is a stand-in that accepts one key: no Temporal is involved (the gateway never touches
  Temporal on the request path anyway; only routes and keys come from it);
* the load generator: a small HTTP/1.1 keep-alive client on raw asyncio protocols with httptools
  parsing (far cheaper per request than a general client, so it leaves the CPU to what is measured),
  started afresh for every measurement.

Scenarios (the targets come from the issue):

(a) echo, 1 client: latency the gateway adds at p50 (target <= 0.5 ms) and p99;
(b) a 20 ms function, maxRequestConcurrency 32, 32 clients: throughput against direct (target >= 90 %);
(c) echo, 32 clients, where the gateway is the limit: requests/s (target >= 3,000).

With `--nats` the gateways join the invocation plane (a nats-server with JetStream started for the run,
slots leased from it), and two more scenarios run:

(d) the durable 202 path: the 20 ms function, 32 clients, `NVCF-POLL-SECONDS: 0`, so every request is
    recorded in JetStream and answered 202 (its result is persisted there): accepted requests/s, p50;
(e) echo, 32 clients split 16/16 over two gateway replicas sharing the plane: total requests/s.

Every round measures direct then gateway for each scenario; the table shows the median over rounds.

The gateway process also runs an event-loop lag probe (a task that sleeps 1 ms and records how late it
wakes) and times its garbage collections; each round prints the loop lag and the longest full
collection next to direct's and the gateway's p99. `--switch` turns a suspect of loop stalls off in the
gateway (`gc-off`, `sweep-off`, `records-off`, `no-gc-freeze`) or gives it the API process's heap
(`api-heap`); see docs/performance.md, "Tail latency".
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ECHO = ROOT / "examples" / "echo" / "server.py"
KEY = "bench-key"
ACCOUNT = "bench-account"
BODY = b'{"prompt": "hello", "max_tokens": 16}'


# --- load generator ---------------------------------------------------------------------------------


def load_main(args: argparse.Namespace) -> None:
    import uvloop

    sys.path.insert(0, str(ROOT))
    from bench.load_client import run_load

    extra = "".join(f"{line}\r\n" for line in args.header)
    result = uvloop.run(
        run_load(
            args.host, args.port, args.path, args.concurrency, args.duration, args.warmup, KEY, BODY, extra
        )
    )
    print(json.dumps(result))


# --- gateway process --------------------------------------------------------------------------------


LAG_PATH = "/bench/lag"
"""GET on the bench's gateway process: the loop-lag figures since the last GET (then reset)."""

SWITCHES = ("api-heap", "no-gc-freeze", "gc-off", "sweep-off", "records-off")
"""Experiment switches of the served gateway (`--switch`): suspects of loop stalls, off one at a time.

`api-heap` makes the gateway process import what `python -m api` imports (FastAPI, Temporal's client,
the routes), so its heap, and the cost of a full garbage collection, is the API process's; `no-gc-freeze`
keeps start-up's objects in the collected generations (`GatewaySettings.freeze_gc_at_start` off)."""


def serve_main(args: argparse.Namespace) -> None:
    import gc

    import uvicorn
    import uvloop

    sys.path.insert(0, str(ROOT))
    from api.gateway import Gateway, GatewaySettings
    from api.http_limits import LimitedHttpToolsProtocol
    from api.principal import ALL_SCOPES, Principal
    from bench.lag_probe import LagProbe

    principal = Principal(account=ACCOUNT, key_id="bench", scopes=ALL_SCOPES)

    def authenticate(header: str | None) -> Principal | None:
        # Stand-in for the key store (which lives in Temporal): one fixed key.
        return principal if header == f"Bearer {KEY}" else None

    from api.observability import GatewayObserver
    from api.observability.records import RequestRecord

    class NoRecords:
        """A request-record store that keeps nothing (switch `records-off`)."""

        def put(self, record: RequestRecord) -> None:
            """Keep nothing."""

        def get(self, request_id: str) -> RequestRecord | None:
            """Know nothing."""
            return None

    switches = set(args.switch)
    if "api-heap" in switches:
        import api.__main__  # only for its imports: the API process's heap
        import api.app  # noqa: F401
    settings = GatewaySettings(
        replica_id=f"bench-{args.port}",
        nats_url=args.nats_url or None,
        freeze_gc_at_start="no-gc-freeze" not in switches,
    )
    if "sweep-off" in switches:
        settings = dataclasses.replace(settings, maintenance_interval_seconds=3600.0)
    observer = GatewayObserver(records=NoRecords()) if "records-off" in switches else None
    gateway = Gateway(authenticate, settings, observer=observer)
    for route in json.loads(args.routes):
        gateway.routes.apply(route)
    probe = LagProbe()
    app = gateway.asgi_app()

    async def probed(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] == LAG_PATH:
            body = json.dumps(probe.take()).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await app(scope, receive, send)

    config = uvicorn.Config(
        probed,
        host=args.host,
        port=args.port,
        loop="uvloop",
        http=LimitedHttpToolsProtocol,  # as `python -m api` serves it
        log_level="warning",
        access_log=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)

    async def serve() -> None:
        task = asyncio.get_running_loop().create_task(probe.run())
        probe.watch_gc()
        if "gc-off" in switches:
            gc.disable()
        try:
            await server.serve()
        finally:
            task.cancel()

    uvloop.run(serve())


# --- orchestration ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait_http(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError as exc:
            # A 4xx/5xx still proves the server is up.
            if getattr(exc, "code", None):
                return
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def _route(version: str, port: int, concurrency: int) -> dict[str, Any]:
    """Return a route shaped like workflows.routes.route_memo output."""
    return {
        "accountId": ACCOUNT,
        "functionId": f"fn-{version}",
        "versionId": version,
        "functionName": version,
        "status": "ACTIVE",
        "deployed": True,
        "inferenceUrl": "/echo",
        "specs": [
            {"gpu": "CPU", "instanceType": "local", "backend": "local", "maxRequestConcurrency": concurrency}
        ],
        "instances": [{"id": f"{version}-0", "address": f"http://127.0.0.1:{port}", "spec": 0}],
        "routesVersion": 1,
    }


def _cpu_seconds(pid: int) -> float | None:
    """Return the CPU time a process used so far (Linux /proc), or None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _load_command(port: int, path: str, concurrency: int, duration: float, headers: list[str]) -> list[str]:
    command = [
        sys.executable,
        __file__,
        "load",
        "--port",
        str(port),
        "--path",
        path,
        "--concurrency",
        str(concurrency),
        "--duration",
        str(duration),
    ]
    for header in headers:
        command += ["--header", header]
    return command


def _run_split_load(ports: list[int], path: str, concurrency: int, duration: float) -> dict[str, Any]:
    """Run one load generator per gateway replica at once, `concurrency` split evenly; sum their figures."""
    share = concurrency // len(ports)
    procs = [
        subprocess.Popen(_load_command(port, path, share, duration, []), stdout=subprocess.PIPE, text=True)
        for port in ports
    ]
    parts = [json.loads(proc.communicate()[0]) for proc in procs]
    return {
        "requests": sum(p["requests"] for p in parts),
        "warmup_requests": sum(p["warmup_requests"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "rps": sum(p["rps"] for p in parts),
        "p50_ms": max(p["p50_ms"] for p in parts),
        "p99_ms": max(p["p99_ms"] for p in parts),
    }


def _run_load(
    port: int,
    path: str,
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
    headers: list[str] | None = None,
) -> dict[str, Any]:
    """Run the load generator once; with `server_pid`, also measure that server's CPU per request."""
    cpu_before = _cpu_seconds(server_pid) if server_pid else None
    out = subprocess.run(
        _load_command(port, path, concurrency, duration, headers or []),
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, Any] = json.loads(out.stdout)
    cpu_after = _cpu_seconds(server_pid) if server_pid else None
    if cpu_before is not None and cpu_after is not None:
        handled = result["requests"] + result["warmup_requests"] + result["errors"]
        result["server_cpu_us"] = (cpu_after - cpu_before) / max(1, handled) * 1e6
    return result


def _lag(port: int) -> dict[str, Any]:
    """Return the gateway process's loop-lag figures since the last call (and reset them)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{LAG_PATH}", timeout=10) as response:
        figures: dict[str, Any] = json.loads(response.read())
        return figures


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores (nproc), {model}, Python {platform.python_version()}"


def _load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main_bench(args: argparse.Namespace) -> int:
    procs: list[subprocess.Popen[bytes]] = []
    load_before = _load_average()
    env = {**os.environ, "HOST": "127.0.0.1"}
    try:
        echo_port, slow_port, gateway_port = _free_port(), _free_port(), _free_port()
        procs.append(subprocess.Popen([sys.executable, str(ECHO)], env={**env, "PORT": str(echo_port)}))
        procs.append(
            subprocess.Popen(
                [sys.executable, str(ECHO)], env={**env, "PORT": str(slow_port), "ECHO_DELAY_MS": "20"}
            )
        )
        routes = [_route("echo", echo_port, 64), _route("slow", slow_port, 32)]
        nats_url = ""
        if args.nats:
            from gpufn.stack import nats_command

            nats_port = _free_port()
            store = Path(tempfile.mkdtemp(prefix="bench-nats-"))
            command = nats_command(store, nats_port, 8 * 1024 * 1024)
            procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            nats_url = f"nats://127.0.0.1:{nats_port}"
            time.sleep(1.0)
        serve = [sys.executable, __file__, "serve", "--routes", json.dumps(routes), "--nats-url", nats_url]
        for switch in args.switch:
            serve += ["--switch", switch]
        procs.append(subprocess.Popen([*serve, "--port", str(gateway_port)]))
        gateway_pid = procs[-1].pid
        second_port = _free_port()
        if args.nats:
            procs.append(subprocess.Popen([*serve, "--port", str(second_port)]))
            _wait_http(f"http://127.0.0.1:{second_port}/v2/nvcf/queues/functions/fn-echo")
        _wait_http(f"http://127.0.0.1:{echo_port}/health")
        _wait_http(f"http://127.0.0.1:{slow_port}/health")
        _wait_http(f"http://127.0.0.1:{gateway_port}/v2/nvcf/queues/functions/fn-echo")

        scenarios = {
            name: spec
            for name, spec in {
                "a": ("echo", echo_port, 1),
                "b": ("slow", slow_port, 32),
                "c": ("echo", echo_port, 32),
                "d": ("slow", slow_port, 32),
                "e": ("echo", echo_port, 32),
            }.items()
            if name in args.scenarios and (name in "abc" or args.nats)
        }
        runs: dict[str, dict[str, list[dict[str, Any]]]] = {
            k: {"direct": [], "gateway": []} for k in scenarios
        }
        for round_no in range(args.rounds):
            for name, (version, port, concurrency) in scenarios.items():
                direct = _run_load(port, "/echo", concurrency, args.duration)
                path = f"/v2/nvcf/pexec/functions/fn-{version}"
                _lag(gateway_port)  # start the loop-lag figures afresh
                if name == "e":
                    gateway = _run_split_load([gateway_port, second_port], path, concurrency, args.duration)
                else:
                    gateway = _run_load(
                        gateway_port,
                        path,
                        concurrency,
                        args.duration,
                        server_pid=gateway_pid,
                        headers=["NVCF-POLL-SECONDS: 0"] if name == "d" else None,
                    )
                gateway.update(_lag(gateway_port))
                if not gateway["requests"]:
                    raise SystemExit(f"scenario {name}: no request was answered by the gateway: {gateway}")
                runs[name]["direct"].append(direct)
                runs[name]["gateway"].append(gateway)
                print(
                    f"round {round_no + 1} ({name}): "
                    f"direct {direct['rps']:.0f} req/s p50 {direct['p50_ms']:.3f} ms"
                    f" | gateway {gateway['rps']:.0f} req/s p50 {gateway['p50_ms']:.3f} ms"
                    f" cpu {gateway.get('server_cpu_us', float('nan')):.0f} us/req"
                    f" errors {direct['errors']}/{gateway['errors']}"
                    f" | p99 direct {direct['p99_ms']:.2f} ms gateway {gateway['p99_ms']:.2f} ms"
                    f" loop lag p99 {gateway.get('lag_p99_ms', float('nan')):.2f}"
                    f" max {gateway.get('lag_max_ms', float('nan')):.1f} ms"
                    f" ({gateway.get('lag_over_10ms', 0)} over 10 ms);"
                    f" full GCs {gateway.get('gc_full', 0)}"
                    f" (longest {gateway.get('gc_full_max_ms', 0):.1f} ms)",
                    flush=True,
                )
    finally:
        for proc in reversed(procs):  # gateways before NATS
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()

    def med(name: str, side: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name][side])

    errors = sum(r["errors"] for n in runs for s in ("direct", "gateway") for r in runs[n][s])
    rows: list[tuple[str, str, str, bool]] = []
    if "a" in runs:
        added_p50 = med("a", "gateway", "p50_ms") - med("a", "direct", "p50_ms")
        added_p99 = med("a", "gateway", "p99_ms") - med("a", "direct", "p99_ms")
        rows.append(
            (
                "(a) echo, 1 client",
                f"direct p50 {med('a', 'direct', 'p50_ms'):.3f} ms / "
                f"p99 {med('a', 'direct', 'p99_ms'):.3f} ms; "
                f"gateway p50 {med('a', 'gateway', 'p50_ms'):.3f} ms / "
                f"p99 {med('a', 'gateway', 'p99_ms'):.3f} ms; "
                f"added p50 {added_p50:.3f} ms, p99 {added_p99:.3f} ms",
                "added p50 <= 0.5 ms",
                added_p50 <= 0.5,
            )
        )
    if "b" in runs:
        ratio_b = med("b", "gateway", "rps") / med("b", "direct", "rps")
        rows.append(
            (
                "(b) 20 ms fn, 32 clients",
                f"direct {med('b', 'direct', 'rps'):.0f} req/s (p50 {med('b', 'direct', 'p50_ms'):.1f} / "
                f"p99 {med('b', 'direct', 'p99_ms'):.1f} ms); gateway {med('b', 'gateway', 'rps'):.0f} req/s "
                f"(p50 {med('b', 'gateway', 'p50_ms'):.1f} / p99 {med('b', 'gateway', 'p99_ms'):.1f} ms); "
                f"{ratio_b:.1%} of direct",
                ">= 90 % of direct",
                ratio_b >= 0.9,
            )
        )
    if "c" in runs:
        rps_c = med("c", "gateway", "rps")
        p99_ratio_c = med("c", "gateway", "p99_ms") / med("c", "direct", "p99_ms")
        cpu_c = (
            statistics.median(r["server_cpu_us"] for r in runs["c"]["gateway"])
            if all("server_cpu_us" in r for r in runs["c"]["gateway"])
            else float("nan")
        )
        rows.append(
            (
                "(c) echo, 32 clients",
                f"gateway {rps_c:.0f} req/s (p50 {med('c', 'gateway', 'p50_ms'):.2f} / "
                f"p99 {med('c', 'gateway', 'p99_ms'):.2f} ms, {cpu_c:.0f} us of gateway CPU per request; "
                f"loop lag p99 {med('c', 'gateway', 'lag_p99_ms'):.2f} / "
                f"max {med('c', 'gateway', 'lag_max_ms'):.1f} ms); "
                f"direct {med('c', 'direct', 'rps'):.0f} req/s (p50 {med('c', 'direct', 'p50_ms'):.2f} / "
                f"p99 {med('c', 'direct', 'p99_ms'):.2f} ms); gateway p99 {p99_ratio_c:.1f}x direct's",
                ">= 3,000 req/s",
                rps_c >= 3000,
            )
        )
    if "d" in runs:
        rows.append(
            (
                "(d) 202 path, 32 clients",
                f"gateway {med('d', 'gateway', 'rps'):.0f} accepted req/s (p50 "
                f"{med('d', 'gateway', 'p50_ms'):.2f} / p99 {med('d', 'gateway', 'p99_ms'):.2f} ms); "
                f"direct {med('d', 'direct', 'rps'):.0f} req/s",
                "(measured)",
                True,
            )
        )
    if "e" in runs:
        rows.append(
            (
                "(e) echo, 2 replicas",
                f"gateways {med('e', 'gateway', 'rps'):.0f} req/s (p50 {med('e', 'gateway', 'p50_ms'):.2f}"
                f" / p99 {med('e', 'gateway', 'p99_ms'):.2f} ms); "
                f"direct {med('e', 'direct', 'rps'):.0f} req/s",
                "(measured)",
                True,
            )
        )
    print()
    print(f"Machine: {_machine()}; load average before {load_before}, after {_load_average()}")
    print(f"{args.rounds} rounds of {args.duration:.0f} s per measurement, medians; errors: {errors}")
    if args.switch:
        print(f"gateway switches: {', '.join(args.switch)}")
    print(f"{'scenario':<26} {'target':<20} {'met':<4} figures")
    for name, figures, target, met in rows:
        print(f"{name:<26} {target:<20} {'yes' if met else 'NO':<4} {figures}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": _machine(), "runs": runs}, indent=2))
    return 0 if all(met for *_, met in rows) and errors == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="(internal) run the load generator once, print JSON")
    load.add_argument("--host", default="127.0.0.1")
    load.add_argument("--port", type=int, required=True)
    load.add_argument("--path", required=True)
    load.add_argument("--concurrency", type=int, default=1)
    load.add_argument("--duration", type=float, default=5.0)
    load.add_argument("--warmup", type=float, default=1.0)
    load.add_argument("--header", action="append", default=[], help="extra request header line")
    serve = sub.add_parser("serve", help="(internal) serve the gateway with the given routes")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, required=True)
    serve.add_argument("--routes", required=True)
    serve.add_argument("--nats-url", default="")
    serve.add_argument("--switch", action="append", default=[], choices=SWITCHES)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--json", help="also write every run's figures to this file")
    parser.add_argument(
        "--scenarios", default="abcde", help="which of the scenarios a-e to run (d, e need --nats)"
    )
    parser.add_argument("--nats", action="store_true", help="gateways on the NATS invocation plane")
    parser.add_argument(
        "--switch",
        action="append",
        default=[],
        choices=SWITCHES,
        help="experiment: switch a suspect of loop stalls off in the gateway (repeatable)",
    )
    args = parser.parse_args()
    if args.command == "load":
        load_main(args)
        return 0
    if args.command == "serve":
        serve_main(args)
        return 0
    return main_bench(args)


if __name__ == "__main__":
    sys.exit(main())
