"""``python -m sender``: serve the API with uvicorn, configured from the environment."""

from __future__ import annotations

import importlib.util

import uvicorn

from runtime import configure_logging, load_settings, tune_gc
from sender.app import create_app
from sender.settings import SenderSettings


def main() -> None:
    settings = load_settings(SenderSettings, "sender")
    configure_logging(settings.log_level)
    app = create_app(settings)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_config=None,  # keep the JSON logging configured above
        log_level=settings.log_level.lower(),
        access_log=False,
        # The client is the connection's peer: X-Forwarded-For counts only behind SENDER_TRUSTED_PROXIES.
        proxy_headers=False,
        timeout_graceful_shutdown=settings.shutdown_grace,
    )


if __name__ == "__main__":
    main()
