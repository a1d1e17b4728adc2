"""Why a pod failed, in more words than its status: its last warning events and its last log lines."""

from __future__ import annotations

import logging
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from activities.kube.cluster import Cluster
from activities.kube.names import CONTAINER
from activities.kube.pods import PodView
from gpufn.kube_inventory import read_json
from workflows.models import InstanceRecord, InstanceStatus

log = logging.getLogger(__name__)

JSON = dict[str, Any]

LOG_TAIL_LINES = 20
LOG_TIMEOUT = (3.0, 5.0)
WARNING_EVENTS = 3


class FailureDetails:
    """Adds a failed pod's warning events and last log lines to its record, fetched once per pod and error."""

    def __init__(self, cluster: Cluster) -> None:
        self._cluster = cluster
        self._cache: dict[str, dict[tuple[str, str], tuple[str, str | None]]] = {}

    async def explained(self, version_id: str, pods: list[JSON], view: PodView) -> InstanceRecord:
        """Return the record, with the pod's warning events and last log lines when it is ERRORED."""
        record = view.record
        if record.status != InstanceStatus.ERRORED or not record.error:
            return record
        cache = self._cache.setdefault(version_id, {})
        key = (view.uid, record.error)
        if key not in cache:
            pod = next((p for p in pods if p["metadata"].get("uid") == view.uid), None)
            if pod is None:
                return record
            cache[key] = await self._cluster.run(self._details_of, pod, view.crashed, record.error)
        events, tail = cache[key]
        error = f"{record.error}\nEvents: {events}" if events else record.error
        return record.model_copy(update={"error": error, "logTail": tail})

    def keep_only(self, version_id: str, alive: set[str]) -> None:
        """Forget the details of the version's pods that are gone (by uid)."""
        cache = self._cache.get(version_id)
        if cache:
            for key in [k for k in cache if k[0] not in alive]:
                del cache[key]

    def forget(self, version_id: str) -> None:
        """Forget everything of a version that is gone."""
        self._cache.pop(version_id, None)

    def _details_of(self, pod: JSON, crashed: bool, error: str) -> tuple[str, str | None]:
        """Return the pod's last warning events that `error` does not say, and its last log lines.

        Best effort: events may have expired, and logs need the kubelet (and the container's runtime).
        """
        meta = pod["metadata"]
        events = ""
        try:
            listed = read_json(
                self._cluster.core.list_namespaced_event,
                meta["namespace"],
                field_selector=f"involvedObject.uid={meta['uid']},type=Warning",
            )
            items = sorted(
                listed.get("items") or [],
                key=lambda e: str(e.get("lastTimestamp") or e.get("eventTime") or ""),
            )
            messages: list[str] = []
            for item in reversed(items):
                message = str(item.get("message") or "")
                if message and message not in messages and message not in error:
                    messages.append(message)
                if len(messages) == WARNING_EVENTS:
                    break
            events = "; ".join(reversed(messages))
        except (ApiException, OSError, ValueError, HTTPError) as err:
            log.info("No events of pod %s: %s", meta["name"], err)
        return events, self._log_tail(meta["namespace"], meta["name"], crashed)

    def _log_tail(self, namespace: str, pod: str, previous: bool) -> str | None:
        for earlier in (True, False) if previous else (False,):
            try:
                response: Any = self._cluster.core.read_namespaced_pod_log(
                    pod,
                    namespace,
                    container=CONTAINER,
                    tail_lines=LOG_TAIL_LINES,
                    previous=earlier,
                    _preload_content=False,
                    _request_timeout=LOG_TIMEOUT,
                )
                try:
                    text = response.data.decode(errors="replace").strip()
                finally:
                    response.release_conn()
            except (ApiException, OSError, ValueError, HTTPError) as err:
                log.info("No log of pod %s/%s: %s", namespace, pod, err)
                continue
            if text:
                return text
        return None
