"""The local backend leaves no network namespace, veth pair or container behind (issue 14 remainder).

Counted with `ip` before and after: a slot claimed by a worker killed before it recorded its instance is
released by the next worker; a stack's stop frees every slot its instances held.
"""

from __future__ import annotations

import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from activities.isolation import (
    HOST_PREFIX,
    SLOTS_DIR,
    SlotAllocator,
    record_claim,
    remove_firewall_if_unused,
)
from activities.local import LocalSupervisor, stop_recorded_instances
from gpufn.isolation_check import unavailable_reason
from gpufn.sealing import SecretBox
from tests.conftest import Stack, cpu_spec, echo_function, running_stack
from tests.lifecycle.helpers import create, deploy, instance_records, wait_running

pytestmark = pytest.mark.skipif(
    unavailable_reason() is not None, reason=f"instance isolation needs root: {unavailable_reason()}"
)
SECRET_KEY = "qvKjAhnYcDdx3kMqg2gVn6kBp3rKs0mUtr9vX5bYl5k="


def netns_names() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def link_names() -> set[str]:
    listing = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, check=True).stdout
    return {line.split(":")[1].strip().split("@")[0] for line in listing.splitlines() if ":" in line}


async def test_next_worker_releases_a_slot_no_instance_recorded(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    # What a worker killed between claiming a slot and recording its instance leaves: the slot's
    # namespace and veth pair, and the note of the claim.
    slot = SlotAllocator("10.213.0.0/16", 1_640_000, home / SLOTS_DIR).claim()
    record_claim(home / SLOTS_DIR, slot)
    assert slot.netns in netns_names() and slot.hostVeth in link_names()

    supervisor = LocalSupervisor(
        home=home,
        cpu_slots=1,
        gpus=[],
        secret_box=SecretBox(SECRET_KEY),
        start_timeout=5,
        private_root=tmp_path,
    )
    await supervisor.start()
    await supervisor.close()

    assert slot.netns not in netns_names()
    assert slot.hostVeth not in link_names()
    assert not list((home / SLOTS_DIR).glob("*.json"))


@pytest.fixture
async def stack(temporal_address: str, tmp_path: Path) -> AsyncIterator[Stack]:
    async with running_stack(temporal_address, tmp_path / "home") as running:
        yield running


async def test_stack_stop_leaves_no_namespace_or_veth(stack: Stack) -> None:
    function = await create(stack, echo_function("leftovers"))
    await deploy(stack, function, cpu_spec(2, 2))
    await wait_running(stack, function, 2)
    slots = [record["slot"] for record in instance_records(stack, function)]
    assert {s["netns"] for s in slots} <= netns_names()
    assert {s["hostVeth"] for s in slots} <= link_names()

    stack.kill_worker()  # as a crash would; the stack's stop then frees what the instances held
    stop_recorded_instances(stack.settings.home, grace_seconds=2)

    assert not {s["netns"] for s in slots} & netns_names()
    assert not {s["hostVeth"] for s in slots} & link_names()
    assert not list((stack.settings.home / SLOTS_DIR).glob("*.json"))
    # Marked for a restart by the next worker, which claims new slots.
    assert all(r["stoppedWithStack"] and r["slot"] is None for r in instance_records(stack, function))


def input_rules(network: str) -> list[str]:
    listing = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True, check=True).stdout
    return [line for line in listing.splitlines() if f"-s {network}" in line]


def test_firewall_rules_are_added_once_and_removed_when_no_instance_is_left(tmp_path: Path) -> None:
    # A network of its own, so this test's rules are told apart from those of stacks running alongside.
    network = "10.251.7.0/28"
    claims = tmp_path / SLOTS_DIR
    first, second = SlotAllocator(network, 1_650_000, claims), SlotAllocator(network, 1_650_000, claims)
    slots = [first.claim(), second.claim(), first.claim()]
    try:
        # Set-up is idempotent: one DROP and one ACCEPT rule, however many claims and allocators.
        assert len(input_rules(network)) == 2, input_rules(network)
    finally:
        for slot in slots:
            first.release(slot)
    removed = remove_firewall_if_unused(claims)
    # Stacks running alongside this test may hold instances: then the rules must stay (theirs share
    # the mechanism), and this test removes its own.
    others = any(name.startswith(HOST_PREFIX) for name in link_names())
    assert removed is not others
    if removed:
        assert input_rules(network) == []
    else:
        for rule in input_rules(network):
            subprocess.run(["iptables", *rule.replace("-A", "-D", 1).split()], check=True)
