"""The `gpufn` command line: run the stack, deploy and follow functions, invoke them, read logs, manage keys.

Commands talk to the API at `GPUFN_API_URL` (default: the embedded stack's) with `GPUFN_API_KEY` (default:
the admin key of the state directory). Progress is drawn live on a terminal and printed as plain lines
otherwise (or with `--plain`), so scripts and CI logs read it too. Shell completion:
`gpufn --install-completion`.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from gpufn.settings import Settings

app = typer.Typer(name="gpufn", help=__doc__, no_args_is_help=True, pretty_exceptions_enable=False)
keys_app = typer.Typer(help="Create, list and revoke API keys (admin key).", no_args_is_help=True)
signal_app = typer.Typer(
    help="Signal a deployed version's workflow (operators and scripts).", no_args_is_help=True
)
functions_app = typer.Typer(help="List functions.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(signal_app, name="signal")
app.add_typer(functions_app, name="functions")

err = Console(stderr=True, highlight=False)

DEFAULT_SCOPES = (
    "register_function,list_functions,update_function,delete_function,deploy_function,"
    "invoke_function,queue_details,list_cluster_groups"
)
FINAL_STATES = frozenset({"ACTIVE", "ERROR", "INACTIVE"})


# --- talking to the API ---------------------------------------------------------------------------------


class Api:
    """The running API, called with the configured key; failures end the command with a message."""

    def __init__(self, settings: Settings) -> None:
        self.url = os.environ.get("GPUFN_API_URL", settings.api_url).rstrip("/")
        key = os.environ.get("GPUFN_API_KEY") or settings.resolved_admin_key()
        self.http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(30, read=330),
            verify=not self.url.startswith("https"),
        )

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send a request; exit with a message when the API cannot be reached."""
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            err.print(f"Cannot reach the gpufn API at {self.url}: {error}. Is `make up` running?")
            raise typer.Exit(2) from error

    def json(self, method: str, path: str, body: Any = None) -> Any:
        """Send a request and return its JSON answer; exit with the API's problem on an error status."""
        response = self.call(method, path, json=body)
        if response.status_code >= 400:
            err.print(f"{method} {path} failed: {response.status_code} {response.text}")
            raise typer.Exit(1)
        return response.json() if response.content else None


def _api() -> Api:
    return Api(Settings())


def _plain(forced: bool) -> bool:
    """Return whether to print plain lines instead of a live display."""
    return forced or not sys.stdout.isatty()


# --- stack --------------------------------------------------------------------------------------------


@app.command()
def up() -> None:
    """Run the embedded stack in the foreground (what `make up` runs)."""
    from gpufn.stack import run_stack

    raise typer.Exit(run_stack(Settings()))


# --- keys ---------------------------------------------------------------------------------------------


@keys_app.command("create")
def keys_create(
    account: Annotated[str, typer.Option(help="The account (NVCF ncaId / NGC org) the key belongs to.")],
    scopes: Annotated[str, typer.Option(help="Comma-separated NVCF scopes.")] = DEFAULT_SCOPES,
    description: Annotated[str, typer.Option(help="What the key is for.")] = "",
) -> None:
    """Create a key; it is printed once."""
    body = {"account": account, "scopes": scopes.split(","), "description": description}
    print(json.dumps(_api().json("POST", "/v2/gpufn/keys", body), indent=2))


@keys_app.command("list")
def keys_list() -> None:
    """List keys (never the keys themselves)."""
    print(json.dumps(_api().json("GET", "/v2/gpufn/keys"), indent=2))


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Revoke a key by its id."""
    _api().json("DELETE", f"/v2/gpufn/keys/{key_id}")
    print(f"revoked {key_id}")


# --- signals ------------------------------------------------------------------------------------------


async def _signal(function_id: str, version_id: str, name: str, value: str | None = None) -> None:
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    from workflows import function_version_workflow_id
    from workflows.function_version import FunctionVersionWorkflow
    from workflows.models import DrainInstanceSignal, ManualInstancesSignal, ReconcileSignal

    settings = Settings()
    client = await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    handle = client.get_workflow_handle(function_version_workflow_id(function_id, version_id))
    if name == "reconcile":
        await handle.signal(FunctionVersionWorkflow.reconcile_now, ReconcileSignal())
    elif name == "scale":
        count = None if value == "auto" else int(value or 0)
        await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=count))
    elif name == "drain":
        await handle.signal(
            FunctionVersionWorkflow.drain_instance, DrainInstanceSignal(instanceId=value or "")
        )
    print(f"sent {name} to {handle.id}")


FunctionArg = Annotated[str, typer.Argument(help="The function's id.")]
VersionArg = Annotated[str, typer.Argument(help="The function version's id.")]


@signal_app.command("reconcile")
def signal_reconcile(function_id: FunctionArg, version_id: VersionArg) -> None:
    """Re-observe the instances and re-apply the desired state now."""
    asyncio.run(_signal(function_id, version_id, "reconcile"))


@signal_app.command("scale")
def signal_scale(
    function_id: FunctionArg,
    version_id: VersionArg,
    count: Annotated[
        str, typer.Argument(help="Instances, or 'auto' to give the count back to the autoscaler.")
    ],
) -> None:
    """Pin the instance count (or 'auto' to give it back to the autoscaler)."""
    asyncio.run(_signal(function_id, version_id, "scale", count))


@signal_app.command("drain")
def signal_drain(
    function_id: FunctionArg,
    version_id: VersionArg,
    instance_id: Annotated[str, typer.Argument(help="The instance to drain.")],
) -> None:
    """Stop routing to one instance, let it finish its requests, then replace it."""
    asyncio.run(_signal(function_id, version_id, "drain", instance_id))


# --- functions ----------------------------------------------------------------------------------------


@functions_app.command("list")
def functions_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON answer.")] = False,
    plain: Annotated[bool, typer.Option(help="Tab-separated lines instead of a table.")] = False,
) -> None:
    """List the functions the key's account sees: id, version, name, status."""
    answer = _api().json("GET", "/v2/nvcf/functions")
    if as_json:
        print(json.dumps(answer, indent=2))
        return
    rows = [(f["id"], f["versionId"], f["name"], f["status"]) for f in answer["functions"]]
    if _plain(plain):
        for row in rows:
            print("\t".join(row))
        return
    table = Table("FUNCTION", "VERSION", "NAME", "STATUS")
    for row in rows:
        table.add_row(*row)
    Console().print(table)


# --- deploy -------------------------------------------------------------------------------------------


def _deployment_path(function_id: str, version_id: str) -> str:
    return f"/v2/nvcf/deployments/functions/{function_id}/versions/{version_id}"


def _summary(deployment: dict[str, Any]) -> str:
    counts = Counter(i["status"] for i in deployment.get("instances") or [])
    instances = ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "none yet"
    return f"{deployment['functionStatus']} (instances: {instances})"


def _progress(deployment: dict[str, Any], elapsed: float) -> Table:
    table = Table(title=f"{deployment['functionStatus']}  {elapsed:.0f}s", title_justify="left")
    table.add_column("INSTANCE")
    table.add_column("STATUS")
    for instance in deployment.get("instances") or []:
        table.add_row(instance["instanceId"], instance["status"])
    return table


@app.command()
def deploy(
    function_id: FunctionArg,
    version_id: VersionArg,
    gpu: Annotated[str, typer.Option(help="GPU model, or CPU.")] = "CPU",
    instance_type: Annotated[str, typer.Option(help="Instance type of the cluster group.")] = "LOCAL.CPU",
    min_instances: Annotated[int, typer.Option(help="Instances kept running.")] = 1,
    max_instances: Annotated[int, typer.Option(help="Most instances the autoscaler starts.")] = 1,
    concurrency: Annotated[int, typer.Option(help="Requests one instance serves at once.")] = 1,
    spec_file: Annotated[
        Path | None,
        typer.Option(help="A JSON deployment body (deploymentSpecifications) instead of the above."),
    ] = None,
    follow: Annotated[bool, typer.Option(help="Follow the deployment until ACTIVE or ERROR.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to follow before giving up.")] = 900.0,
    plain: Annotated[bool, typer.Option(help="Plain progress lines instead of a live display.")] = False,
) -> None:
    """Deploy a function version and follow it to ACTIVE (exit 0) or ERROR (exit 1, with its healthInfo)."""
    api = _api()
    if spec_file is not None:
        body = json.loads(spec_file.read_text())
    else:
        spec = {
            "gpu": gpu,
            "instanceType": instance_type,
            "minInstances": min_instances,
            "maxInstances": max_instances,
            "maxRequestConcurrency": concurrency,
        }
        body = {"deploymentSpecifications": [spec]}
    path = _deployment_path(function_id, version_id)
    deployment = api.json("POST", path, body)["deployment"]
    if not follow:
        print(_summary(deployment))
        return
    started = time.monotonic()
    deployment = _follow(api, path, deployment, started, timeout, _plain(plain))
    status = deployment["functionStatus"]
    if status == "ACTIVE":
        print(f"ACTIVE after {time.monotonic() - started:.1f}s")
        return
    if status == "ERROR":
        err.print(f"ERROR after {time.monotonic() - started:.1f}s")
        for info in deployment.get("healthInfo") or []:
            err.print(f"  {info.get('gpu', '')} {info.get('instanceType', '')}: {info.get('error', '')}")
        raise typer.Exit(1)
    err.print(f"Still {status} after {timeout:.0f}s")
    raise typer.Exit(3)


def _follow(
    api: Api, path: str, deployment: dict[str, Any], started: float, timeout: float, plain: bool
) -> dict[str, Any]:
    """Poll the deployment until a final state or `timeout`, showing each change; return its last state."""
    deadline = started + timeout
    if plain:
        last = ""
        while True:
            line = _summary(deployment)
            if line != last:
                print(f"{time.monotonic() - started:6.1f}s  {line}", flush=True)
                last = line
            if deployment["functionStatus"] in FINAL_STATES or time.monotonic() >= deadline:
                return deployment
            time.sleep(1)
            deployment = api.json("GET", path)["deployment"]
    with Live(_progress(deployment, 0), console=Console(), refresh_per_second=4, transient=False) as live:
        while deployment["functionStatus"] not in FINAL_STATES and time.monotonic() < deadline:
            time.sleep(1)
            deployment = api.json("GET", path)["deployment"]
            live.update(_progress(deployment, time.monotonic() - started))
    return deployment


# --- invoke -------------------------------------------------------------------------------------------


@app.command()
def invoke(
    function_id: FunctionArg,
    data: Annotated[
        str, typer.Option("--data", "-d", help="The JSON body, or @FILE to read it from.")
    ] = "{}",
    version_id: Annotated[str | None, typer.Option("--version", help="Pin a version.")] = None,
    poll_seconds: Annotated[int, typer.Option(help="Seconds each request waits before a 202.")] = 30,
    timeout: Annotated[float, typer.Option(help="Seconds to follow 202s before giving up.")] = 600.0,
) -> None:
    """Invoke a function, follow 202s until the answer, print its body (exit 1 on an error status)."""
    api = _api()
    body = Path(data[1:]).read_bytes() if data.startswith("@") else data.encode()
    path = f"/v2/nvcf/pexec/functions/{function_id}"
    if version_id is not None:
        path += f"/versions/{version_id}"
    headers = {"Content-Type": "application/json", "NVCF-POLL-SECONDS": str(poll_seconds)}
    response = api.call("POST", path, content=body, headers=headers)
    deadline = time.monotonic() + timeout
    while response.status_code == 202 and time.monotonic() < deadline:
        request_id = response.headers["nvcf-reqid"]
        err.print(f"in progress: {request_id}")
        response = api.call(
            "GET", f"/v2/nvcf/pexec/status/{request_id}", headers={"NVCF-POLL-SECONDS": str(poll_seconds)}
        )
    if "nvcf-reqid" in response.headers:
        err.print(f"request {response.headers['nvcf-reqid']}: {response.status_code}")
    sys.stdout.write(response.text + ("" if response.text.endswith("\n") else "\n"))
    if response.status_code == 202:
        raise typer.Exit(3)
    if response.status_code >= 400:
        raise typer.Exit(1)


# --- logs ---------------------------------------------------------------------------------------------


@app.command()
def logs(
    function_id: FunctionArg,
    version_id: VersionArg,
    instance: Annotated[str | None, typer.Option(help="One instance (default: every instance).")] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing new lines.")] = False,
) -> None:
    """Print a version's instance logs (local backend: from the state directory this command runs on)."""
    settings = Settings()
    deployment = _api().json("GET", _deployment_path(function_id, version_id))["deployment"]
    ids = [i["instanceId"] for i in deployment.get("instances") or []]
    if instance is not None:
        ids = [instance]
    files = [(i, settings.home / "logs" / f"{i}.log") for i in ids]
    present = [(i, f) for i, f in files if f.exists()]
    if not present:
        err.print(
            "No local log files for these instances in "
            f"{settings.home / 'logs'}: instances on Kubernetes log to their pods (kubectl logs)."
        )
        raise typer.Exit(1)
    prefix = len(present) > 1
    offsets = {}
    for instance_id, path in present:
        offsets[instance_id] = _print_new(instance_id, path, 0, prefix, whole=not follow)
    while follow:
        time.sleep(0.5)
        for instance_id, path in present:
            offsets[instance_id] = _print_new(instance_id, path, offsets[instance_id], prefix, whole=False)


def _print_new(instance_id: str, path: Path, offset: int, prefix: bool, whole: bool) -> int:
    """Print the log's lines after `offset` (a last unfinished line only when `whole`); return the offset."""
    with path.open("rb") as file:
        file.seek(offset)
        chunk = file.read()
    if not whole:
        chunk = chunk[: chunk.rfind(b"\n") + 1]  # a line still being written waits for its end
    for line in chunk.decode(errors="replace").splitlines():
        print(f"[{instance_id}] {line}" if prefix else line, flush=True)
    return offset + len(chunk)


def main(argv: list[str] | None = None) -> int:
    """Run the `gpufn` command; return its exit status."""
    try:
        app(args=argv, prog_name="gpufn")
    except SystemExit as exit_:
        code = exit_.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
