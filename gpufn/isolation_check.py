"""Whether this machine can isolate local-backend instances (own uid and network namespace each).

Asked by the local backend before it starts an instance and by the `make up` supervisor for its banner,
so it lives below both: the supervisor does not import the worker's code.
"""

from __future__ import annotations

import os
import shutil

ISOLATION_TOOLS = ("ip", "nsenter", "setpriv")
"""The commands isolation runs (Debian packages iproute2 and util-linux)."""


def unavailable_reason() -> str | None:
    """Return why instances cannot be isolated here, or None when they can."""
    if os.geteuid() != 0:
        return "the worker does not run as root"
    missing = [tool for tool in ISOLATION_TOOLS if shutil.which(tool) is None]
    if missing:
        return f"{', '.join(missing)} not found (Debian packages iproute2 and util-linux)"
    return None
