"""The invocation gateway (data plane): NVCF's pexec, status and queue endpoints, no Temporal on the path.

`api/app.py` owns the wiring: it builds one `Gateway` per API process, feeds `gateway.routes` from
visibility (`apply(route_memo)` / `remove(version_id)`), puts `gateway.handle` in front of the FastAPI app
and calls `start()` and `close()` from the app's lifespan.
"""

from api.gateway.gateway import Gateway, replica_tag
from api.gateway.routes import Instance, RouteTable, VersionRoute
from api.gateway.settings import GatewaySettings

__all__ = ["Gateway", "GatewaySettings", "Instance", "RouteTable", "VersionRoute", "replica_tag"]
