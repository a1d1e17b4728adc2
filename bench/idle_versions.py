"""Benchmark: what N deployed but idle versions cost at rest (worker, API and Temporal CPU; history growth).

Starts a Temporal dev server (SQLite file, as `make up`), a worker and an API as separate processes,
measures their CPU for a quiet baseline with no version deployed, then registers N versions and deploys
each with minInstances 0 / maxInstances 2 (so every version's watcher runs with its autoscaler, with no
instance process to confound the figures), lets them settle, and measures CPU and the growth of the
versions' histories over a window long enough to hold a heartbeat of every watcher (they beat every
4 minutes).

Usage: python bench/idle_versions.py [N] [--window SECONDS] [--baseline-window SECONDS]
       (defaults: 1000, 300, 30)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gpufn.stack import free_port, temporal_cli  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """Return user+system CPU seconds of a process and its reaped children."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(fields[i]) for i in (11, 12, 13, 14)) / TICKS


async def measure(processes: dict[str, subprocess.Popen[bytes]], window: float) -> dict[str, float]:
    before = {name: cpu_seconds(p.pid) for name, p in processes.items()}
    await asyncio.sleep(window)
    return {name: (cpu_seconds(p.pid) - before[name]) / window * 100 for name, p in processes.items()}


async def history_lengths(client: Client, ids: list[str]) -> int:
    total = 0
    for workflow_id in ids:
        described = await client.get_workflow_handle(workflow_id).describe()
        total += described.raw_description.workflow_execution_info.history_length
    return total


async def main(count: int, window: float, baseline_window: float) -> None:
    home = Path(tempfile.mkdtemp(prefix="gpufn-idle-"))
    key = "nvapi-bench-" + uuid.uuid4().hex
    ports = {"api": free_port(), "temporal": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    env.update(
        {
            "GPUFN_HOME": str(home),
            "GPUFN_TEMPORAL_ADDRESS": f"127.0.0.1:{ports['temporal']}",
            "GPUFN_ADMIN_KEY": key,
            "GPUFN_API_PORT": str(ports["api"]),
            "PYTHONUNBUFFERED": "1",
        }
    )
    flags = []
    for attribute in sa.ALL:
        kind = "Datetime" if attribute is sa.ROUTES_UPDATED_AT else "Keyword"
        flags += ["--search-attribute", f"{attribute.name}={kind}"]
    log = (home / "processes.log").open("wb")
    processes = {
        "temporal": subprocess.Popen(
            [
                temporal_cli(),
                "server",
                "start-dev",
                "--db-filename",
                str(home / "temporal.db"),
                "--port",
                str(ports["temporal"]),
                "--headless",
                "--http-port",
                str(free_port()),
                "--metrics-port",
                str(free_port()),
                "--log-level",
                "error",
                *flags,
            ],
            stdout=log,
            stderr=log,
        )
    }
    try:
        client = None
        for _ in range(100):
            with contextlib.suppress(Exception):
                client = await Client.connect(
                    env["GPUFN_TEMPORAL_ADDRESS"], data_converter=pydantic_data_converter
                )
                break
            await asyncio.sleep(0.2)
        assert client is not None, "Temporal did not start"
        processes["worker"] = subprocess.Popen(
            [sys.executable, "-m", "worker"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
        processes["api"] = subprocess.Popen(
            [sys.executable, "-m", "api"], env=env, cwd=ROOT, stdout=log, stderr=log
        )
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{ports['api']}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
        ) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            await asyncio.sleep(3)
            baseline = await measure(processes, baseline_window)
            started = time.perf_counter()
            semaphore = asyncio.Semaphore(8)
            ids: list[str] = []

            async def deploy(n: int) -> None:
                async with semaphore:
                    fn = (
                        await http.post(
                            "/v2/nvcf/functions",
                            json={
                                "name": f"idle-{n}",
                                "inferenceUrl": "/echo",
                                "containerImage": "example.com/e:1",
                                "containerArgs": "python examples/echo/server.py",
                            },
                        )
                    ).json()["function"]
                    spec = {"gpu": "CPU", "instanceType": "LOCAL.CPU", "minInstances": 0, "maxInstances": 2}
                    response = await http.post(
                        f"/v2/nvcf/deployments/functions/{fn['id']}/versions/{fn['versionId']}",
                        json={"deploymentSpecifications": [spec]},
                    )
                    response.raise_for_status()
                    ids.append(f"function:{fn['id']}:{fn['versionId']}")

            await asyncio.gather(*(deploy(n) for n in range(count)))
            took = time.perf_counter() - started
            await asyncio.sleep(15)  # let every watcher start and the first heartbeats settle
            events_before = await history_lengths(client, ids[:100])
            loaded = await measure(processes, window)
            events_after = await history_lengths(client, ids[:100])
    finally:
        for name in ("api", "worker", "temporal"):
            process = processes.get(name)
            if process is not None:
                process.terminate()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=20)
    print(f"machine: {os.cpu_count()} cores; {count} versions registered and deployed in {took:.0f} s")
    print(f"CPU over {window:.0f} s at rest (baseline: {baseline_window:.0f} s with nothing deployed)")
    print(f"{'process':<10}{'idle stack, % of a core':>26}{f'{count} idle versions':>24}")
    for name in ("temporal", "worker", "api"):
        print(f"{name:<10}{baseline[name]:>26.1f}{loaded[name]:>24.1f}")
    growth = (events_after - events_before) / min(100, len(ids)) / window * 3600
    print(f"history growth at rest: {growth:.1f} events per version per hour (sampled on 100 versions)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("count", nargs="?", type=int, default=1000)
    parser.add_argument("--window", type=float, default=300.0)
    parser.add_argument("--baseline-window", type=float, default=30.0)
    arguments = parser.parse_args()
    asyncio.run(main(arguments.count, arguments.window, arguments.baseline_window))
