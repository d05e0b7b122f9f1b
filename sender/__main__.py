"""``python -m sender``: serve the API with uvicorn, configured from the environment."""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from contract.runtime import tune_gc
from sender.app import create_app
from sender.settings import SenderSettings


def main() -> None:
    settings = SenderSettings()
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    app = create_app(settings)
    tune_gc()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        log_level=settings.log_level.lower(),
        access_log=False,
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
