"""What the local machine offers as a cluster group: its NVIDIA GPUs (through NVML) and CPU slots."""

from __future__ import annotations

import ctypes
import logging
import re
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOCAL_CLUSTER_GROUP = "local"
CPU_GPU_NAME = "CPU"
CPU_INSTANCE_TYPE = "LOCAL.CPU"


@dataclass(frozen=True)
class LocalGpu:
    """One NVIDIA GPU of this machine."""

    index: int
    name: str
    """Short product name as NVCF spells GPUs, e.g. H100, L40S, A100."""


def short_gpu_name(product: str) -> str:
    """Turn NVML's product name ("NVIDIA H100 80GB HBM3") into NVCF's GPU name ("H100")."""
    words = [
        w for w in re.split(r"[\s_-]+", product) if w and w.upper() not in ("NVIDIA", "TESLA", "GEFORCE")
    ]
    return words[0].upper() if words else product.upper()


def local_instance_type(gpu_name: str) -> str:
    """Return the local backend's instance type for one GPU of `gpu_name`, e.g. LOCAL.GPU.H100_1x."""
    return f"LOCAL.GPU.{gpu_name}_1x"


def parse_local_gpus(text: str) -> list[LocalGpu]:
    """Parse the `GPUFN_LOCAL_GPUS` override ("H100,H100,L40S") into GPUs numbered from 0."""
    names = [n.strip() for n in re.split(r"[,\s]+", text) if n.strip()]
    return [LocalGpu(index=i, name=n) for i, n in enumerate(names) if n.upper() != CPU_GPU_NAME]


def discover_gpus() -> list[LocalGpu]:
    """Return this machine's NVIDIA GPUs through NVML; none when the driver is absent."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return []
    try:
        if nvml.nvmlInit_v2() != 0:
            return []
        count = ctypes.c_uint()
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return []
        gpus = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            if nvml.nvmlDeviceGetHandleByIndex_v2(index, ctypes.byref(handle)) != 0:
                continue
            name = ctypes.create_string_buffer(96)
            if nvml.nvmlDeviceGetName(handle, name, 96) != 0:
                continue
            gpus.append(LocalGpu(index=index, name=short_gpu_name(name.value.decode())))
        return gpus
    except (AttributeError, OSError) as err:
        log.warning("NVML discovery failed: %s", err)
        return []
    finally:
        shutdown = getattr(nvml, "nvmlShutdown", None)
        if shutdown is not None:
            shutdown()


def local_cluster_group(gpus: list[LocalGpu], cpu_slots: int) -> dict[str, object]:
    """Return the `local` cluster group in NVCF's `clusterGroups[]` shape."""
    entries: list[dict[str, object]] = []
    for name in sorted({g.name for g in gpus}):
        count = sum(1 for g in gpus if g.name == name)
        entries.append(
            {
                "name": name,
                "capacity": count,
                "instanceTypes": [
                    {
                        "name": local_instance_type(name),
                        "description": f"One {name} GPU of this machine ({count} in all)",
                        "default": True,
                    }
                ],
            }
        )
    entries.append(
        {
            "name": CPU_GPU_NAME,
            "capacity": cpu_slots,
            "instanceTypes": [
                {
                    "name": CPU_INSTANCE_TYPE,
                    "description": f"A process without a GPU ({cpu_slots} at once)",
                    "default": True,
                }
            ],
        }
    )
    return {
        "id": LOCAL_CLUSTER_GROUP,
        "name": LOCAL_CLUSTER_GROUP,
        "ncaId": None,
        "authorizedNcaIds": ["*"],
        "gpus": entries,
        "clusters": [{"id": LOCAL_CLUSTER_GROUP, "name": LOCAL_CLUSTER_GROUP, "k8sVersion": None}],
    }
