"""This replica's side of the shared invocation plane: the slots it leases and the queues it pulls.

For every routed version, one task pulls the version's shared (NATS) queue whenever this replica has a
free slot for it, and for every instance one task leases this replica's share of the instance's slots
on demand and gives them back when idle. The dispatcher tells the feed when routes change, a slot frees
or a request had to queue here; the feed hands each pulled request back to the dispatcher to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from api.gateway.invocations import Invocation
from api.gateway.plane import FETCH_SECONDS, LEASE_SECONDS, Plane
from api.gateway.routes import Instance, VersionRoute

log = logging.getLogger(__name__)

LEASE_WINDOW_SECONDS = 1.0
"""Every this long a replica gives back the leased slots of an instance that it did not use at once."""


class PlaneFeed:
    """Leases slots and pulls shared queues for one replica.

    Args:
        plane: The shared invocation plane.
        pending: The dispatcher's requests that wait for an answer, by id (a pulled request that this
            replica accepted is started as the same invocation, so its waiters get the answer).
        start: Starts a pulled request on an instance with a free slot (the dispatcher's).
        pump: Starts the requests queued in this replica's own memory (streams that wait) on the slots
            it now holds (the dispatcher's).
    """

    def __init__(
        self,
        plane: Plane,
        pending: dict[str, Invocation],
        start: Callable[[Invocation, Instance], None],
        pump: Callable[[VersionRoute], None],
    ) -> None:
        self._plane = plane
        self._pending = pending
        self._start = start
        self._pump = pump
        self._pullers: dict[str, asyncio.Task[None]] = {}
        """Per version, the task that pulls its shared queue while this replica has a free slot."""
        self._slot_freed: dict[str, asyncio.Event] = {}
        self._leasers: dict[tuple[str, str], asyncio.Task[None]] = {}
        """Per (version, instance), the task that leases and gives back this replica's slots on it."""
        self._demand: dict[str, asyncio.Event] = {}
        """Per version, set when a request of it had to queue here (wake the leasers)."""

    async def close(self) -> None:
        """Stop pulling and leasing (held slots are given back)."""
        background = [*self._pullers.values(), *self._leasers.values()]
        for task in background:
            task.cancel()
        if background:
            await asyncio.gather(*background, return_exceptions=True)
        self._pullers.clear()
        self._leasers.clear()

    def routes_changed(self, version: VersionRoute) -> None:
        """Pull the version's queue and lease slots on each of its active instances, if not yet."""
        loop = asyncio.get_running_loop()
        if version.active and version.version_id not in self._pullers:
            self._pullers[version.version_id] = loop.create_task(self._pull_forever(version))
        for instance in version.active:
            key = (version.version_id, instance.id)
            if key not in self._leasers:
                self._leasers[key] = loop.create_task(self._lease_forever(version, instance))
        self.slot_free(version)

    def route_removed(self, version: VersionRoute) -> None:
        """Stop pulling the queue of a version that left the routes."""
        puller = self._pullers.pop(version.version_id, None)
        if puller is not None:
            puller.cancel()

    def wanted(self, version: VersionRoute) -> None:
        """Note that a request of `version` queued here: lease more slots if any are free."""
        event = self._demand.get(version.version_id)
        if event is not None:
            event.set()

    def slot_free(self, version: VersionRoute) -> None:
        """Note that a slot of `version` may have freed here: pull its queue."""
        event = self._slot_freed.get(version.version_id)
        if event is not None:
            event.set()

    async def _lease_forever(self, version: VersionRoute, instance: Instance) -> None:
        """Hold this replica's share of the instance's slots: lease on demand, give back when idle."""
        key = (version.version_id, instance.id)
        try:
            while not version.removed and instance.routed and version.instances.get(instance.id) is instance:
                try:
                    await self._lease(version, instance)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("Leasing slots of instance %s failed: %r", instance.id, exc)
                    await asyncio.sleep(1.0)
        finally:
            if self._leasers.get(key) is asyncio.current_task():
                del self._leasers[key]

    async def _lease(self, version: VersionRoute, instance: Instance) -> None:
        plane = self._plane
        subscription = await plane.slot_subscription(version.version_id, instance.id, instance.limit)
        demand = self._demand.setdefault(version.version_id, asyncio.Event())
        held: list[Any] = []
        renewed = window_start = time.monotonic()
        try:
            while not version.removed and instance.routed and version.instances.get(instance.id) is instance:
                now = time.monotonic()
                if held and now - renewed > LEASE_SECONDS / 3:
                    renewed = now
                    await asyncio.gather(*(token.in_progress() for token in held))
                # Requests wait here: in the shared queue (accepted by this replica) or in its memory
                # (streams, which are never 202'd and so never persisted).
                waiting_here = version.durable_waiting + len(version.queue)
                queued_here = version.backlog or waiting_here > 0
                if now - window_start >= LEASE_WINDOW_SECONDS:
                    # Keep what the busiest moment of the last window used; give the rest back for the
                    # other replicas' requests (all of it once idle). Nothing while requests queue here.
                    keep = len(held) if queued_here else max(instance.peak, instance.in_flight)
                    instance.peak = instance.in_flight
                    window_start = now
                    if len(held) > keep:
                        giving, held = held[keep:], held[:keep]
                        instance.capacity = len(held)
                        await asyncio.gather(*(token.nak() for token in giving))
                        continue
                # A fetch that timed out here may still have been answered: such tokens wait in the
                # subscription and count as held by this replica, so they are taken (and given back).
                stray = subscription.pending_msgs > 0
                if stray or (queued_here and len(held) < instance.limit):
                    # As many as wait here (at least one): a replica leases what its load needs.
                    wanted = max(1, min(instance.limit - len(held), waiting_here))
                    try:
                        tokens = await subscription.fetch(wanted, timeout=1.0)
                    except TimeoutError:
                        continue
                    held.extend(tokens)
                    instance.capacity = len(held)
                    renewed = time.monotonic()
                    self._pump(version)
                    self.slot_free(version)
                    continue
                demand.clear()
                try:
                    await asyncio.wait_for(demand.wait(), LEASE_WINDOW_SECONDS)
                except TimeoutError:
                    if not held and await plane.queue_depth(version.version_id) > 0:
                        # Requests wait that no live replica asked for (their replica died): serve them.
                        version.backlog = True
        finally:
            instance.capacity = 0
            for token in held:
                with contextlib.suppress(Exception):
                    await token.nak()

    async def _pull_forever(self, version: VersionRoute) -> None:
        """Pull the version's shared queue whenever this replica has a free slot for it."""
        while not version.removed:
            try:
                await self._pull(version)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("Pulling the queue of version %s failed: %r", version.version_id, exc)
                await asyncio.sleep(1.0)

    async def _pull(self, version: VersionRoute) -> None:
        plane = self._plane
        subscription = await plane.subscribe_queue(version.version_id)
        event = self._slot_freed.setdefault(version.version_id, asyncio.Event())
        while not version.removed:
            if version.pick() is None:
                if subscription.pending_msgs > 0:
                    # Delivered after a fetch timed out: back to the queue for a replica with a free slot.
                    for message in await subscription.fetch(subscription.pending_msgs, timeout=1.0):
                        await message.nak()
                event.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 1.0)
                continue
            try:
                messages = await subscription.fetch(1, timeout=FETCH_SECONDS)
            except TimeoutError:
                version.backlog = False
                continue
            for message in messages:
                instance = version.pick()
                if instance is None:
                    # A direct request took the slot meanwhile: back to the queue for whoever has one.
                    await message.nak()
                    version.backlog = True
                    continue
                version.backlog = message.metadata.num_pending > 0
                queued = Plane.decode_queued(message)
                invocation = self._pending.get(queued.request_id)
                if invocation is not None and invocation.attempts == 0:
                    version.durable_waiting = max(0, version.durable_waiting - 1)
                if invocation is None:
                    invocation = Invocation(
                        queued.request_id,
                        version,
                        queued.account,
                        queued.subject,
                        queued.body,
                        queued.client_headers,
                        False,
                        max(0.0, queued.deadline - time.time()),
                    )
                invocation.durable = True
                invocation.fetched = queued
                self._start(invocation, instance)
