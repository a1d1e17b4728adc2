"""A device plugin for the real node: advertises ``nvidia.com/gpu`` through the kubelet's device-plugin API.

A real GPU node runs NVIDIA's device plugin: it registers with the kubelet over gRPC, lists its GPUs, and
answers the kubelet's ``Allocate`` with what a container needs to see the GPUs it was given (the NVIDIA
container toolkit reads ``NVIDIA_VISIBLE_DEVICES``). This one does the same for GPUs that do not exist: the
kubelet puts the listed devices into the node's capacity and hands a pod's devices to ``Allocate``, whose
environment variables reach the container. Nothing is mounted (there is no ``/dev/nvidia*`` here).

The messages of the kubelet's API ``v1beta1`` (the subset the kubelet uses with the options below) are
built here with protobuf's descriptor API, field numbers as the API defines them; the gRPC services are
served with generic handlers. The kubelet's socket is ``/var/lib/kubelet/device-plugins/kubelet.sock`` in its
mount namespace, which is a directory of the node's state directory bound there (``node.py``): the plugin
listens next to it and the kubelet dials it there.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

log = logging.getLogger(__name__)

API_VERSION = "v1beta1"
PACKAGE = "v1beta1"
RESOURCE_NAME = "nvidia.com/gpu"
KUBELET_SOCKET = "kubelet.sock"

_STRING = descriptor_pb2.FieldDescriptorProto.TYPE_STRING
_BOOL = descriptor_pb2.FieldDescriptorProto.TYPE_BOOL
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_OPTIONAL = descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED

# name -> [(field name, number, type, label, message type name or "")]; map<string,string> fields are the
# repeated `<Name>Entry` messages protobuf encodes maps as.
_MESSAGES: dict[str, list[tuple[str, int, int, int, str]]] = {
    "Empty": [],
    "DevicePluginOptions": [
        ("pre_start_required", 1, _BOOL, _OPTIONAL, ""),
        ("get_preferred_allocation_available", 2, _BOOL, _OPTIONAL, ""),
    ],
    "RegisterRequest": [
        ("version", 1, _STRING, _OPTIONAL, ""),
        ("endpoint", 2, _STRING, _OPTIONAL, ""),
        ("resource_name", 3, _STRING, _OPTIONAL, ""),
        ("options", 4, _MESSAGE, _OPTIONAL, "DevicePluginOptions"),
    ],
    "Device": [("ID", 1, _STRING, _OPTIONAL, ""), ("health", 2, _STRING, _OPTIONAL, "")],
    "ListAndWatchResponse": [("devices", 1, _MESSAGE, _REPEATED, "Device")],
    "ContainerAllocateRequest": [("devicesIDs", 1, _STRING, _REPEATED, "")],
    "AllocateRequest": [("container_requests", 1, _MESSAGE, _REPEATED, "ContainerAllocateRequest")],
    "ContainerAllocateResponse": [
        ("envs", 1, _MESSAGE, _REPEATED, "ContainerAllocateResponse.EnvsEntry"),
    ],
    "AllocateResponse": [("container_responses", 1, _MESSAGE, _REPEATED, "ContainerAllocateResponse")],
    "PreStartContainerRequest": [("devicesIDs", 1, _STRING, _REPEATED, "")],
    "PreStartContainerResponse": [],
}


def _build_messages() -> dict[str, Any]:
    """The message classes of the subset of the device-plugin API used here."""
    proto = descriptor_pb2.FileDescriptorProto(
        name="gpufn_test/deviceplugin_v1beta1.proto", package=PACKAGE, syntax="proto3"
    )
    for name, fields in _MESSAGES.items():
        message = proto.message_type.add(name=name)
        for field_name, number, kind, label, type_name in fields:
            field = message.field.add(name=field_name, number=number, type=kind, label=label)
            if type_name:
                field.type_name = f".{PACKAGE}.{type_name}"
    # map<string, string> envs = 1;
    [allocate] = [m for m in proto.message_type if m.name == "ContainerAllocateResponse"]
    entry = allocate.nested_type.add(name="EnvsEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=_STRING, label=_OPTIONAL)
    entry.field.add(name="value", number=2, type=_STRING, label=_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in _MESSAGES
    }


MESSAGES = _build_messages()


def _method(request: str, response: str) -> dict[str, Any]:
    return {
        "request_deserializer": MESSAGES[request].FromString,
        "response_serializer": MESSAGES[response].SerializeToString,
    }


class FakeGpuDevicePlugin:
    """Serves ``count`` GPUs named ``GPU-<node>-<n>`` to the kubelet whose device-plugin directory is given.

    Args:
        plugin_dir: The host path of the kubelet's ``/var/lib/kubelet/device-plugins``.
        node_name: Used in the device IDs.
        count: Number of GPUs.
    """

    def __init__(self, plugin_dir: Path, node_name: str, count: int) -> None:
        self.plugin_dir = plugin_dir
        self.endpoint = "gpufn-gpu.sock"
        self.device_ids = [f"GPU-{node_name}-{n}" for n in range(count)]
        self.allocations: list[list[str]] = []
        self._server: grpc.Server | None = None
        self._stopped = threading.Event()

    # --- the DevicePlugin service -----------------------------------------------------------------------

    def _options(self, request: Any, context: grpc.ServicerContext) -> Any:
        return MESSAGES["DevicePluginOptions"]()

    def _list_and_watch(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        devices = [MESSAGES["Device"](ID=i, health="Healthy") for i in self.device_ids]
        yield MESSAGES["ListAndWatchResponse"](devices=devices)
        # The kubelet keeps the stream open; health never changes here.
        while not self._stopped.wait(1.0) and context.is_active():
            pass

    def _allocate(self, request: Any, context: grpc.ServicerContext) -> Any:
        responses = []
        for container in request.container_requests:
            ids = list(container.devicesIDs)
            self.allocations.append(ids)
            # What NVIDIA's plugin tells the container toolkit: which GPUs this container sees.
            responses.append(
                MESSAGES["ContainerAllocateResponse"](envs={"NVIDIA_VISIBLE_DEVICES": ",".join(ids)})
            )
        return MESSAGES["AllocateResponse"](container_responses=responses)

    def _pre_start(self, request: Any, context: grpc.ServicerContext) -> Any:
        return MESSAGES["PreStartContainerResponse"]()

    # --- lifecycle ------------------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> None:
        """Serve on the plugin socket and register with the kubelet (retried until its socket answers).

        Raises:
            TimeoutError: The kubelet did not accept the registration in time.
        """
        handler = grpc.method_handlers_generic_handler(
            f"{PACKAGE}.DevicePlugin",
            {
                "GetDevicePluginOptions": grpc.unary_unary_rpc_method_handler(
                    self._options, **_method("Empty", "DevicePluginOptions")
                ),
                "ListAndWatch": grpc.unary_stream_rpc_method_handler(
                    self._list_and_watch, **_method("Empty", "ListAndWatchResponse")
                ),
                "Allocate": grpc.unary_unary_rpc_method_handler(
                    self._allocate, **_method("AllocateRequest", "AllocateResponse")
                ),
                "PreStartContainer": grpc.unary_unary_rpc_method_handler(
                    self._pre_start, **_method("PreStartContainerRequest", "PreStartContainerResponse")
                ),
            },
        )
        deadline = time.monotonic() + timeout
        # The kubelet empties the directory when its device manager starts, then creates its socket: serve
        # only after that, as NVIDIA's plugin does (it starts over whenever the kubelet's socket is new).
        kubelet = self.plugin_dir / KUBELET_SOCKET
        while not kubelet.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the kubelet did not create {kubelet}")
            time.sleep(0.2)
        socket_path = self.plugin_dir / self.endpoint
        socket_path.unlink(missing_ok=True)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        server.add_generic_rpc_handlers((handler,))
        server.add_insecure_port(f"unix://{socket_path}")
        server.start()
        self._server = server
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                self._register()
                return
            except grpc.RpcError as err:
                last = err
                time.sleep(0.5)
        raise TimeoutError(f"the kubelet did not accept the device plugin: {last}")

    def _register(self) -> None:
        kubelet = self.plugin_dir / KUBELET_SOCKET
        with grpc.insecure_channel(f"unix://{kubelet}") as channel:
            register = channel.unary_unary(
                f"/{PACKAGE}.Registration/Register",
                request_serializer=MESSAGES["RegisterRequest"].SerializeToString,
                response_deserializer=MESSAGES["Empty"].FromString,
            )
            register(
                MESSAGES["RegisterRequest"](
                    version=API_VERSION,
                    endpoint=self.endpoint,
                    resource_name=RESOURCE_NAME,
                    options=MESSAGES["DevicePluginOptions"](),
                ),
                timeout=5,
            )

    def stop(self) -> None:
        """Stop serving (the kubelet then marks the devices unhealthy)."""
        self._stopped.set()
        if self._server is not None:
            self._server.stop(grace=0).wait(5)
            self._server = None
