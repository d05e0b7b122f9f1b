"""A fake vLLM OpenAI server, for tests, ``make run`` and benchmarks on machines without a GPU.

It answers vLLM's endpoints with vLLM's shapes, status codes and error
messages, schedules requests like vLLM (a batch limit, a waiting queue, fcfs
or priority order) and times tokens like a GPU would, so a proxy in front of
it cannot tell the difference. It is a raw ASGI app because it shares the
machine with the system it measures and must cost next to no CPU.
"""

from simulator.app import Simulator, create_app
from simulator.settings import SimulatorSettings

__all__ = ["Simulator", "SimulatorSettings", "create_app"]
