"""GPUFN_DEPLOY_TIMEOUT reaches the deployment: a version that never becomes healthy ends in ERROR after the
configured time, over HTTP against a real stack."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import cpu_spec, echo_function, running_stack
from tests.lifecycle.helpers import create, deploy, deployment, wait_status

DEPLOY_TIMEOUT_SECONDS = 3.0


async def test_configured_deploy_timeout_ends_a_stuck_deployment_in_error(
    temporal_address: str, tmp_path: Path
) -> None:
    async with running_stack(temporal_address, tmp_path, deploy_timeout=DEPLOY_TIMEOUT_SECONDS) as stack:
        # A process that never answers its health check keeps the instance STARTING.
        function = await create(stack, echo_function("stuck", containerArgs="sleep 600"))
        await deploy(stack, function, cpu_spec(1, 1))
        assert (await deployment(stack, function))["functionStatus"] == "DEPLOYING"
        failed = await wait_status(stack, function, "ERROR", timeout=DEPLOY_TIMEOUT_SECONDS + 15)
        errors = " ".join(entry["error"] for entry in failed["healthInfo"])
        assert f"within {DEPLOY_TIMEOUT_SECONDS:.0f} s" in errors, failed["healthInfo"]
