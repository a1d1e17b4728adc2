"""Stopping every local instance of a stack when the stack stops (`make up`'s Ctrl-C, the test harness)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from activities.isolation import SLOTS_DIR, reap_unrecorded, remove_firewall_if_unused
from activities.local.containers import remove_containers_now, remove_state_if_unused
from activities.local.process import stop_processes
from activities.local.records import (
    CONTAINER_RUNTIME,
    STOP_GRACE_SECONDS,
    STOPPED_WITH_STACK,
    is_alive,
    load_records,
    release,
    save_record,
)
from workflows.models import InstanceStatus


def stop_recorded_instances(home: Path, grace_seconds: float = STOP_GRACE_SECONDS) -> int:
    """Stop every instance recorded under `home` and free what they held; return how many were running.

    The records stay, marked as stopped with the stack, so the next worker starts them again under the
    same ids. Every namespace, veth pair, private directory and container goes, so a stack that does not
    come back leaves nothing behind; the firewall rule goes too once no instance of any stack is left.
    """
    records = load_records(home / "instances")
    alive = [r for r in records if is_alive(r)]
    stop_processes([r for r in alive if r.runtime != CONTAINER_RUNTIME], grace_seconds)
    containers = [r.container_name for r in records if r.runtime == CONTAINER_RUNTIME]
    if containers:
        remove_containers_now(home, containers, grace_seconds)
    # The containers' storage is memory (tmpfs): give it back when the stack stops.
    remove_state_if_unused(home)
    for record in records:
        if record.status != InstanceStatus.ERRORED.value:
            # Not a fault of the function: the next worker starts it again, under the same id.
            record.stoppedWithStack = True
            record.error = STOPPED_WITH_STACK
        release(record)
        with contextlib.suppress(OSError):
            save_record(home / "instances", record)
    # Slots claimed by a start the stack's stop cut short.
    reap_unrecorded(home / SLOTS_DIR, set())
    remove_firewall_if_unused(home / SLOTS_DIR)
    return len(alive)
