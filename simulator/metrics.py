"""``/metrics`` in Prometheus text format, with the series vLLM exports that a dispatcher reads.

Written by hand, not with ``prometheus_client``: a scrape every 100 ms per
consumer must cost next to nothing. The ``simulator:`` series exist only here;
tests use them to check that a cancelled request stopped generating.
"""

from __future__ import annotations

from simulator.engine import Engine

CONTENT_TYPE = b"text/plain; version=1.0.0; charset=utf-8"

# (name, type, help, extra labels), in the order ``MetricsRenderer.render`` gives the values.
# vLLM 0.32 does not count requests its clients abandoned in any ``request_success_total``
# (its ``abort`` sample stays 0): they only stop generating, so the simulator leaves them out too.
_SERIES = (
    ("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", ""),
    ("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", ""),
    ("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", ""),
    ("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", ""),
    ("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", ""),
    (
        "vllm:request_success_total",
        "counter",
        "Count of successfully processed requests.",
        ',finished_reason="length"',
    ),
    ("simulator:requests_aborted_total", "counter", "Requests abandoned by their client.", ""),
    (
        "simulator:requests_peak",
        "gauge",
        "Most requests running and waiting at once since the start.",
        "",
    ),
    (
        "simulator:generation_tokens_aborted_total",
        "counter",
        "Tokens generated for requests later abandoned by their client.",
        "",
    ),
)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class MetricsRenderer:
    """Renders the engine's state; the fixed parts of the text are built once."""

    def __init__(self, engine: Engine, model: str) -> None:
        self._engine = engine
        # Labels in vLLM's (alphabetical) order: engine, any extra one, model_name.
        model_label = f'model_name="{_label(model)}"'
        self._prefixes = [
            f'# HELP {name} {doc}\n# TYPE {name} {kind}\n{name}{{engine="0"{extra},{model_label}}} '
            for name, kind, doc, extra in _SERIES
        ]

    def render(self) -> bytes:
        engine = self._engine
        stats = engine.stats
        values = (
            engine.running,
            engine.waiting,
            engine.running / engine.max_num_seqs,
            stats.prompt_tokens,
            engine.generation_tokens(),
            stats.requests_finished,
            stats.requests_aborted,
            engine.peak_requests,
            stats.generation_tokens_aborted,
        )
        lines = [f"{prefix}{float(value)!r}\n" for prefix, value in zip(self._prefixes, values, strict=True)]
        return "".join(lines).encode()
