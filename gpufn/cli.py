"""The `gpufn` command line: run the embedded stack, manage API keys, and signal deployments."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import ssl
import sys
import urllib.error
import urllib.request
from typing import Any

from gpufn.settings import Settings


def _api(settings: Settings, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """Call the running API with the admin key (or GPUFN_API_KEY) and return the decoded JSON."""
    key = os.environ.get("GPUFN_API_KEY") or settings.resolved_admin_key()
    url = os.environ.get("GPUFN_API_URL", settings.api_url).rstrip("/") + path
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    context = ssl._create_unverified_context() if url.startswith("https") else None
    try:
        with urllib.request.urlopen(request, context=context, timeout=30) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:
        raise SystemExit(f"{method} {path} failed: {err.code} {err.read().decode(errors='replace')}") from err
    except urllib.error.URLError as err:
        raise SystemExit(f"Cannot reach the gpufn API at {url}: {err.reason}. Is `make up` running?") from err
    return json.loads(raw) if raw else None


def _keys(args: argparse.Namespace, settings: Settings) -> int:
    if args.keys_command == "create":
        body = {"account": args.account, "scopes": args.scopes.split(","), "description": args.description}
        created = _api(settings, "POST", "/v2/gpufn/keys", body)
        print(json.dumps(created, indent=2))
    elif args.keys_command == "list":
        print(json.dumps(_api(settings, "GET", "/v2/gpufn/keys"), indent=2))
    elif args.keys_command == "revoke":
        _api(settings, "DELETE", f"/v2/gpufn/keys/{args.key_id}")
        print(f"revoked {args.key_id}")
    return 0


async def _signal(args: argparse.Namespace, settings: Settings) -> int:
    from temporalio.client import Client
    from temporalio.contrib.pydantic import pydantic_data_converter

    from workflows import function_version_workflow_id
    from workflows.function_version import FunctionVersionWorkflow
    from workflows.models import DrainInstanceSignal, ManualInstancesSignal, ReconcileSignal

    client = await Client.connect(
        settings.temporal_target,
        namespace=settings.temporal_namespace,
        data_converter=pydantic_data_converter,
    )
    handle = client.get_workflow_handle(function_version_workflow_id(args.function_id, args.version_id))
    if args.signal_command == "reconcile":
        await handle.signal(FunctionVersionWorkflow.reconcile_now, ReconcileSignal())
    elif args.signal_command == "scale":
        count = None if args.count == "auto" else int(args.count)
        await handle.signal(FunctionVersionWorkflow.set_manual_instances, ManualInstancesSignal(count=count))
    elif args.signal_command == "drain":
        await handle.signal(
            FunctionVersionWorkflow.drain_instance, DrainInstanceSignal(instanceId=args.instance_id)
        )
    print(f"sent {args.signal_command} to {handle.id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the `gpufn` command."""
    parser = argparse.ArgumentParser(prog="gpufn", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("up", help="run the embedded stack in the foreground (what `make up` runs)")

    keys = commands.add_parser("keys", help="create, list and revoke API keys (admin key)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    create = key_commands.add_parser("create", help="create a key; it is printed once")
    create.add_argument(
        "--account", required=True, help="the account (NVCF ncaId / NGC org) the key belongs to"
    )
    create.add_argument(
        "--scopes",
        default="register_function,list_functions,update_function,delete_function,deploy_function,"
        "invoke_function,queue_details,list_cluster_groups",
        help="comma-separated NVCF scopes",
    )
    create.add_argument("--description", default="")
    key_commands.add_parser("list", help="list keys (never the keys themselves)")
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")

    sig = commands.add_parser("signal", help="signal a deployed version's workflow (operators and scripts)")
    sig_commands = sig.add_subparsers(dest="signal_command", required=True)
    for name, help_text in (
        ("reconcile", "re-observe the instances and re-apply the desired state now"),
        ("scale", "pin the instance count (or 'auto' to give it back to the autoscaler)"),
        ("drain", "stop routing to one instance, let it finish its requests, then replace it"),
    ):
        sub = sig_commands.add_parser(name, help=help_text)
        sub.add_argument("function_id")
        sub.add_argument("version_id")
        if name == "scale":
            sub.add_argument("count", help="instances, or 'auto'")
        if name == "drain":
            sub.add_argument("instance_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the `gpufn` command."""
    args = build_parser().parse_args(argv)
    settings = Settings()
    if args.command == "up":
        from gpufn.stack import run_stack

        return run_stack(settings)
    if args.command == "keys":
        return _keys(args, settings)
    if args.command == "signal":
        return asyncio.run(_signal(args, settings))
    return 2


if __name__ == "__main__":
    sys.exit(main())
