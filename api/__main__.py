"""Run the API process: `python -m api` (the embedded stack starts it this way)."""

from __future__ import annotations

import logging

import uvicorn

from api.app import create_app
from api.http_limits import LimitedHttpToolsProtocol
from gpufn.settings import Settings


def main() -> None:
    """Serve the API with uvicorn (uvloop and httptools), over HTTPS when a certificate is configured."""
    settings = Settings()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s api %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.api_host,
        port=settings.api_port,
        loop="uvloop",
        http=LimitedHttpToolsProtocol,
        access_log=False,
        # No proxy sits in front of the embedded API; parsing forwarded headers costs per request.
        proxy_headers=False,
        log_level="warning",
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
