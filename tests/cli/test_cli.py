"""The `gpufn` CLI against a real stack: deploy followed to ACTIVE and to ERROR, invoke, list, logs.

The CLI runs as a subprocess whose output is a pipe, so it prints plain progress lines (no terminal).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from tests.conftest import ADMIN_KEY, Stack, echo_function
from tests.lifecycle.helpers import create

LOUD_ECHO = "python tests/cli/loud_echo.py"
"""Echo that prints a line first (instances run in a private directory: the script path is resolved)."""


async def gpufn(stack: Stack, *args: str, timeout: float = 90) -> tuple[int, str, str]:
    """Run `gpufn ARGS` in a subprocess (the API serves on this event loop, so never block it)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFN_")}
    env.update(
        {"GPUFN_API_URL": stack.api_url, "GPUFN_API_KEY": ADMIN_KEY, "GPUFN_HOME": str(stack.settings.home)}
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gpufn.cli",
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=timeout)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_deploy_follows_to_active_then_invoke_list_and_logs(stack: Stack) -> None:
    function: dict[str, Any] = await create(stack, echo_function("cli-active", containerArgs=LOUD_ECHO))
    fid, vid = function["id"], function["versionId"]

    code, out, err = await gpufn(stack, "deploy", fid, vid, "--min-instances", "1", "--max-instances", "1")
    assert code == 0, err
    lines = out.splitlines()
    assert "DEPLOYING" in lines[0]
    assert lines[-1].startswith("ACTIVE after ")
    assert any("1 RUNNING" in line and "ACTIVE" in line for line in lines[:-1]), out

    code, out, err = await gpufn(stack, "invoke", fid, "-d", json.dumps({"n": 7}))
    assert code == 0, err
    assert json.loads(out) == {"n": 7}
    # Longer than a poll window: the CLI gets a 202 and follows it to the answer.
    code, out, err = await gpufn(
        stack, "invoke", fid, "--poll-seconds", "1", "-d", json.dumps({"delaySeconds": 2.5, "n": 8})
    )
    assert code == 0, err
    assert json.loads(out) == {"delaySeconds": 2.5, "n": 8}
    assert "in progress" in err
    code, out, err = await gpufn(stack, "invoke", fid, "-d", json.dumps({"status": 500, "error": "boom"}))
    assert code == 1
    assert "boom" in out

    code, out, err = await gpufn(stack, "functions", "list", "--plain")
    assert code == 0, err
    assert f"{fid}\t{vid}\tcli-active\tACTIVE" in out.splitlines()

    code, out, err = await gpufn(stack, "logs", fid, vid)
    assert code == 0, err
    assert "hello from the instance" in out


async def test_deploy_follows_to_error_and_shows_health_info(stack: Stack) -> None:
    failing = echo_function(
        "cli-error", containerArgs="python -c \"print('model weights missing'); exit(3)\""
    )
    function = await create(stack, failing)
    code, out, err = await gpufn(stack, "deploy", function["id"], function["versionId"])
    assert code == 1
    assert "DEPLOYING" in out.splitlines()[0]
    assert "ERROR after" in err
    assert "exited with code 3" in err and "model weights missing" in err


async def test_help_and_existing_commands(stack: Stack) -> None:
    code, out, _ = await gpufn(stack, "--help")
    assert code == 0
    for command in ("up", "deploy", "invoke", "logs", "functions", "keys", "signal"):
        assert command in out
    code, out, err = await gpufn(stack, "keys", "list")
    assert code == 0, err
    assert "keys" in json.loads(out)
