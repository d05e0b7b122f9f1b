"""``python -m consumer``: serve one model from one backend, configured from the environment."""

from __future__ import annotations

import asyncio
import signal

from consumer.settings import ConsumerSettings
from consumer.worker import Worker
from runtime import configure_logging, load_settings, tune_gc


async def _main() -> None:
    settings = load_settings(ConsumerSettings, "consumer")
    configure_logging(settings.log_level)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    worker = Worker(settings)
    tune_gc()
    await worker.run(stop)


def main() -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main())
    else:
        uvloop.run(_main())


if __name__ == "__main__":
    main()
