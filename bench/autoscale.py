"""Benchmark: autoscaling on the local backend under a load step, a hold, and a drop to zero.

Everything is real: a Temporal dev server, the worker and the API as separate processes, echo instances
as processes, and closed-loop clients invoking through the gateway. The function takes a fixed time per
request (ECHO_DELAY_MS). The script prints the time from the load step to the scale-up decision and to
the new instance serving, the peak queue depth, failed or lost requests, scale-down and scale-to-zero
times, and the instance count over time (table and PNG), with NVCF's own 15 s loop as the baseline.

Usage: python bench/autoscale.py [--out bench/out]
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
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_model, start_dev_server  # noqa: E402
from gpufn.stack import free_port  # noqa: E402

REQUEST_SECONDS = 0.2
CONCURRENCY = 4
CLIENTS = 24
IDLE_BEFORE = 5.0
HOLD = 40.0
OBSERVE_AFTER = 60.0
NVCF_LOOP_SECONDS = 15.0
DECISION_TARGET = 2.0


@dataclass
class Sample:
    t: float
    running: int
    starting: int
    desired: int
    queue: int


@dataclass
class Results:
    samples: list[Sample] = field(default_factory=list)
    ok: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    decisions: list[tuple[float, int, str]] = field(default_factory=list)


async def client_loop(http: httpx.AsyncClient, path: str, stop: asyncio.Event, results: Results) -> None:
    while not stop.is_set():
        try:
            response = await http.post(path, json={"x": 1}, headers={"NVCF-POLL-SECONDS": "60"})
            while response.status_code == 202:
                response = await http.get(
                    f"/v2/nvcf/pexec/status/{response.headers['NVCF-REQID']}",
                    headers={"NVCF-POLL-SECONDS": "60"},
                )
            if response.status_code == 200:
                results.ok += 1
            else:
                results.failed += 1
                results.failures.append(f"{response.status_code} {response.text[:200]}")
        except httpx.HTTPError as err:
            results.failed += 1
            results.failures.append(repr(err))


async def sampler(
    http: httpx.AsyncClient, fn: dict[str, Any], t0: float, stop: asyncio.Event, results: Results
) -> None:
    deployment_path = f"/v2/nvcf/deployments/functions/{fn['id']}/versions/{fn['versionId']}"
    queue_path = f"/v2/nvcf/queues/functions/{fn['id']}/versions/{fn['versionId']}"
    seen_decisions: set[str] = set()
    while not stop.is_set():
        body = (await http.get(deployment_path)).json()["deployment"]
        queue = await http.get(queue_path)
        depth = queue.json()["queues"][0]["queueDepth"] if queue.status_code == 200 else 0
        instances = body["instances"]
        scaling = body["scaling"]
        results.samples.append(
            Sample(
                t=time.monotonic() - t0,
                running=sum(1 for i in instances if i["status"] == "RUNNING"),
                starting=sum(1 for i in instances if i["status"] == "STARTING"),
                desired=scaling.get("desired", 0),
                queue=depth,
            )
        )
        decided = scaling.get("decidedAt")
        if decided and decided not in seen_decisions and scaling.get("lastDecision"):
            seen_decisions.add(decided)
            at = datetime.fromisoformat(decided.replace("Z", "+00:00")).timestamp()
            results.decisions.append(
                (at, scaling["lastDecision"]["desired"], scaling["lastDecision"]["rule"])
            )
        await asyncio.sleep(0.2)


def first_time(samples: list[Sample], after: float, predicate: Any) -> float | None:
    for sample in samples:
        if sample.t >= after and predicate(sample):
            return sample.t
    return None


def plot(results: Results, step: float, drop: float, out: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    t = [s.t for s in results.samples]
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.step(t, [s.running for s in results.samples], where="post", label="serving instances")
    ax.step(t, [s.desired for s in results.samples], where="post", label="desired", linestyle="--")
    ax.plot(t, [s.queue for s in results.samples], label="queue depth", alpha=0.6)
    ax.axvline(step, color="green", linestyle=":", label="load step")
    ax.axvline(drop, color="red", linestyle=":", label="load drop")
    ax.set_xlabel("seconds")
    ax.set_ylabel("count")
    ax.set_title(
        f"gpufn autoscaling: {CLIENTS} clients, {REQUEST_SECONDS * 1000:.0f} ms requests, "
        f"concurrency {CONCURRENCY}"
    )
    ax.legend(loc="upper right")
    fig.tight_layout()
    path = out / "autoscale.png"
    fig.savefig(path, dpi=110)
    return path


async def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    env = await start_dev_server()
    home = Path(tempfile.mkdtemp(prefix="gpufn-autoscale-"))
    key = "nvapi-bench-" + uuid.uuid4().hex
    port = free_port()
    proc_env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    proc_env.update(
        {
            "GPUFN_HOME": str(home),
            "GPUFN_TEMPORAL_ADDRESS": env.client.service_client.config.target_host,
            "GPUFN_ADMIN_KEY": key,
            "GPUFN_API_PORT": str(port),
            "PYTHONUNBUFFERED": "1",
        }
    )
    logs = [(home / "worker.log").open("wb"), (home / "api.log").open("wb")]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "worker"], env=proc_env, cwd=ROOT, stdout=logs[0], stderr=logs[0]
        ),
        subprocess.Popen(
            [sys.executable, "-m", "api"], env=proc_env, cwd=ROOT, stdout=logs[1], stderr=logs[1]
        ),
    ]
    results = Results()
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {key}"},
            timeout=120,
            limits=httpx.Limits(max_connections=CLIENTS + 8),
        ) as http:
            for _ in range(300):
                with contextlib.suppress(httpx.HTTPError):
                    if (await http.get("/health")).status_code == 200:
                        break
                await asyncio.sleep(0.2)
            fn = (
                await http.post(
                    "/v2/nvcf/functions",
                    json={
                        "name": "autoscale-bench",
                        "inferenceUrl": "/echo",
                        "containerImage": "example.com/echo:1",
                        "containerArgs": f"{sys.executable} examples/echo/server.py",
                        "containerEnvironment": [
                            {"key": "ECHO_DELAY_MS", "value": str(int(REQUEST_SECONDS * 1000))}
                        ],
                        "health": {
                            "protocol": "HTTP",
                            "uri": "/health",
                            "port": 8000,
                            "timeout": "PT5S",
                            "expectedStatusCode": 200,
                        },
                    },
                )
            ).json()["function"]
            spec = {
                "gpu": "CPU",
                "instanceType": "LOCAL.CPU",
                "minInstances": 0,
                "maxInstances": 8,
                "maxRequestConcurrency": CONCURRENCY,
                "gpufnAutoscaler": {
                    "stableWindowSeconds": 10,
                    "panicWindowSeconds": 2,
                    "scaleDownDelaySeconds": 10,
                    "scaleToZeroIdleSeconds": 20,
                    "drainTimeoutSeconds": 30,
                },
            }
            deployed = await http.post(
                f"/v2/nvcf/deployments/functions/{fn['id']}/versions/{fn['versionId']}",
                json={"deploymentSpecifications": [spec]},
            )
            deployed.raise_for_status()
            t0 = time.monotonic()
            wall0 = time.time()
            stop_sampling = asyncio.Event()
            sampling = asyncio.create_task(sampler(http, fn, t0, stop_sampling, results))
            await asyncio.sleep(IDLE_BEFORE)
            step = time.monotonic() - t0
            stop_clients = asyncio.Event()
            path = f"/v2/nvcf/pexec/functions/{fn['id']}"
            clients = [
                asyncio.create_task(client_loop(http, path, stop_clients, results)) for _ in range(CLIENTS)
            ]
            await asyncio.sleep(HOLD)
            stop_clients.set()
            await asyncio.gather(*clients)
            drop = time.monotonic() - t0
            await asyncio.sleep(OBSERVE_AFTER)
            stop_sampling.set()
            await sampling
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
        from activities.local import stop_recorded_instances

        stop_recorded_instances(home, grace_seconds=2)
        await env.shutdown()

    samples = results.samples
    decision_up = next(
        (at - wall0 for at, desired, _ in results.decisions if at - wall0 >= step and desired > 0), None
    )
    serving = first_time(samples, step, lambda s: s.running >= 1)
    peak_running = max((s.running for s in samples), default=0)
    peak_queue = max((s.queue for s in samples), default=0)
    scaled_down = first_time(samples, drop, lambda s: 0 < s.running < peak_running)
    zero = first_time(samples, drop, lambda s: s.running == 0 and s.starting == 0)
    png = plot(results, step, drop, out)
    table = out / "autoscale.tsv"
    table.write_text(
        "t\tserving\tstarting\tdesired\tqueue\n"
        + "".join(f"{s.t:.1f}\t{s.running}\t{s.starting}\t{s.desired}\t{s.queue}\n" for s in samples)
    )

    def fmt(value: float | None, origin: float) -> str:
        return "never" if value is None else f"{value - origin:.1f} s"

    print(f"machine: {os.cpu_count()} cores, {cpu_model()}")
    print(
        f"load: {CLIENTS} closed-loop clients, {REQUEST_SECONDS * 1000:.0f} ms per request, "
        f"maxRequestConcurrency {CONCURRENCY}, min 0 / max 8 instances, hold {HOLD:.0f} s"
    )
    print(f"{'measure':<44}{'gpufn':>12}{'baseline':>22}")
    print(f"{'load step -> scale-up decision':<44}{fmt(decision_up, step):>12}{'NVCF loop: up to 15 s':>22}")
    print(f"{'load step -> first instance serving':<44}{fmt(serving, step):>12}")
    print(f"{'peak serving instances':<44}{peak_running:>12}")
    print(f"{'peak queue depth':<44}{peak_queue:>12}")
    print(f"{'requests ok / failed or lost':<44}{f'{results.ok} / {results.failed}':>12}")
    print(f"{'load drop -> first scale-down':<44}{fmt(scaled_down, drop):>12}")
    print(f"{'load drop -> zero instances':<44}{fmt(zero, drop):>12}")
    if decision_up is not None:
        met = decision_up - step <= DECISION_TARGET
        print(f"decision target <= {DECISION_TARGET:.0f} s: {'met' if met else 'MISSED'}")
    print(f"instance count over time: {table}" + (f", plot: {png}" if png else ""))
    print("t(s)  serving  desired  queue")
    last = None
    for sample in samples:
        row = (sample.running, sample.desired, sample.queue)
        if row != last:
            print(f"{sample.t:5.1f}  {sample.running:7d}  {sample.desired:7d}  {sample.queue:5d}")
            last = row
    for failure in results.failures[:5]:
        print("failure:", failure)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out")
    asyncio.run(main(parser.parse_args().out))
