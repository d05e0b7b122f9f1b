"""``python -m simulator``: serve the simulator with uvicorn, configured from ``SIMULATOR_*``.

uvloop and httptools are the cheapest loop and HTTP parser uvicorn offers;
the access log and the proxy-headers middleware are off because they would
cost more per request than answering it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import signal
from types import FrameType

import uvicorn

from simulator.app import create_app
from simulator.settings import SimulatorSettings


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> None:
    settings = SimulatorSettings()
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        http="httptools" if importlib.util.find_spec("httptools") else "h11",
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=5,
    )
    # uvicorn re-raises the signal it stopped on once it is done; exit with 0 then, not a traceback.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    with contextlib.suppress(KeyboardInterrupt):
        uvicorn.Server(config).run()


if __name__ == "__main__":
    main()
