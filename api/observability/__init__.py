"""Observability of the API process: the gateway's metrics, the record of every request, and the observer
that feeds both from the gateway's hook points.
"""

from api.observability.metrics import GatewayMetrics
from api.observability.observer import GatewayObserver
from api.observability.records import MemoryRequestRecords, RequestRecord, RequestRecords

__all__ = ["GatewayMetrics", "GatewayObserver", "MemoryRequestRecords", "RequestRecord", "RequestRecords"]
