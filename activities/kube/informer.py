"""One list-then-watch loop that keeps a kind of object of a cluster in memory, grouped by a label.

The container backend keeps every gpufn pod of a cluster with one; the Helm backend keeps its release
namespaces with one, and the pods of each release namespace with one each. All use this class.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from typing import Any

from kubernetes.watch.watch import iter_resp_lines

from activities.kube.names import VERSION_LABEL
from gpufn.kube_inventory import REQUEST_TIMEOUT, read_json

log = logging.getLogger(__name__)

JSON = dict[str, Any]

WATCH_SECONDS = 240
"""The API server ends each watch after this long; the informer then watches again from where it was."""
RELIST_BACKOFF_SECONDS = (0.5, 10.0)


class _WatchExpired(Exception):
    """The watch's resource version is too old (410): list again."""


class _WatchFailed(Exception):
    """The API server ended the watch with an error event: list again after a back-off."""


class Informer:
    """Keeps the objects one list call returns in memory: one list, then one watch, listing again on any gap.

    Runs in its own thread (the `kubernetes` client is synchronous); `on_change` is called from that thread
    with the keys (values of `key_label`) whose objects changed.

    Args:
        list_call: A list call of the `kubernetes` client, e.g. `CoreV1Api.list_pod_for_all_namespaces` or
            `functools.partial(CoreV1Api.list_namespaced_pod, namespace)`; it is also called to watch.
        label_selector: Which objects to keep (None: all that the call lists).
        on_change: Called with the keys whose objects changed.
        name: Names the thread.
        key_label: The label that groups the objects (objects without it are kept under "").
    """

    def __init__(
        self,
        list_call: Callable[..., Any],
        label_selector: str | None,
        on_change: Callable[[set[str]], None],
        name: str,
        key_label: str = VERSION_LABEL,
    ) -> None:
        self._list = list_call
        self._selector = label_selector
        self._on_change = on_change
        self._key_label = key_label
        self._by_key: dict[str, dict[str, JSON]] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._response: Any = None
        self.synced = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"gpufn-watch-{name}", daemon=True)

    def start(self) -> None:
        """Start listing and watching."""
        self._thread.start()

    def stop(self) -> None:
        """Stop watching (blocks up to a few seconds)."""
        self._stopping.set()
        response = self._response
        if response is not None:
            with contextlib.suppress(Exception):
                response.shutdown()
        self._thread.join(timeout=5)

    def items(self, key: str) -> list[JSON]:
        """Return the objects of a key, those being deleted included."""
        with self._lock:
            return list(self._by_key.get(key, {}).values())

    def _key(self, item: JSON) -> str:
        return str((item["metadata"].get("labels") or {}).get(self._key_label, ""))

    def _selected(self) -> dict[str, Any]:
        return {"label_selector": self._selector} if self._selector else {}

    def _run(self) -> None:
        backoff = RELIST_BACKOFF_SECONDS[0]
        while not self._stopping.is_set():
            try:
                version = self._relist()
                backoff = RELIST_BACKOFF_SECONDS[0]
                while not self._stopping.is_set():
                    version = self._watch(version)
            except _WatchExpired:
                continue
            except Exception as err:
                # Whatever breaks the watch (connection refused, timeouts, 5xx, a dropped stream), the
                # informer must outlive it: list again after a back-off.
                if self._stopping.is_set():
                    return
                self.last_error = f"{type(err).__name__}: {err}"
                log.warning("Watch failed (%s); listing again in %.1f s", self.last_error, backoff)
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, RELIST_BACKOFF_SECONDS[1])

    def _relist(self) -> str:
        listed = read_json(self._list, **self._selected())
        fresh: dict[str, dict[str, JSON]] = {}
        for item in listed.get("items") or []:
            fresh.setdefault(self._key(item), {})[item["metadata"]["uid"]] = item
        with self._lock:
            changed = set(self._by_key) | set(fresh)
            self._by_key = fresh
        self.last_error = None
        self.synced.set()
        self._on_change(changed)
        return str(listed["metadata"].get("resourceVersion") or "")

    def _watch(self, resource_version: str) -> str:
        response: Any = self._list(
            **self._selected(),
            watch=True,
            resource_version=resource_version,
            timeout_seconds=WATCH_SECONDS,
            allow_watch_bookmarks=True,
            _preload_content=False,
            _request_timeout=(REQUEST_TIMEOUT[0], WATCH_SECONDS + 30),
        )
        self._response = response
        try:
            for line in iter_resp_lines(response):
                if not line or self._stopping.is_set():
                    continue
                event = json.loads(line)
                kind, item = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if item.get("code") == 410:
                        raise _WatchExpired()
                    raise _WatchFailed(f"{item.get('code')} {item.get('reason')}: {item.get('message')}")
                resource_version = str(item.get("metadata", {}).get("resourceVersion") or resource_version)
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._apply(kind, item)
        finally:
            self._response = None
            response.release_conn()
        return resource_version

    def _apply(self, kind: str, item: JSON) -> None:
        meta = item["metadata"]
        key = self._key(item)
        with self._lock:
            items = self._by_key.setdefault(key, {})
            if kind == "DELETED":
                items.pop(meta["uid"], None)
                if not items:
                    del self._by_key[key]
            else:
                items[meta["uid"]] = item
        self._on_change({key})
