"""The local backend: each function instance is a process, or a podman container, on this machine.

Where the worker runs as root, each instance runs as its own uid in its own network namespace, addressed
by its veth address (see `activities.isolation`); elsewhere it runs as the worker's user on its own
loopback address (processes only). Either way its environment is built from the function's spec alone,
and its secrets are opened only when it starts: instance records hold sealed values, never plaintext.

Modules: `records` (what an instance is, on disk), `process` and `containers` (the two runtimes),
`supervisor` (start, probe, adopt, stop), `backend` (the `Backend` of cluster group `local`), `shutdown`
(stop everything when the stack stops). The names other packages import are re-exported here.
"""

from activities.local.backend import LocalBackend
from activities.local.records import NO_COMMAND_LINE, STOPPED_WITH_STACK, LocalInstance
from activities.local.shutdown import stop_recorded_instances
from activities.local.supervisor import LocalSupervisor

__all__ = [
    "NO_COMMAND_LINE",
    "STOPPED_WITH_STACK",
    "LocalBackend",
    "LocalInstance",
    "LocalSupervisor",
    "stop_recorded_instances",
]
