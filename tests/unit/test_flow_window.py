"""The consumer's flow window: vLLM's load read from its metrics, the window following it."""

from __future__ import annotations

from consumer.backend import BackendLoad, parse_vllm_metrics
from consumer.flow import Window

VLLM_METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
vllm:num_requests_waiting{engine="0",model_name="m"} 1.0
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.5
vllm:num_requests_waiting_by_reason{reason="capacity"} 9.0
"""


def test_parse_vllm_metrics() -> None:
    assert parse_vllm_metrics(VLLM_METRICS) == BackendLoad(running=5.0, waiting=1.0, kv_cache=0.5)
    assert parse_vllm_metrics("http_requests_total 3\n") is None


def test_window_grows_while_the_backend_keeps_up_and_shrinks_when_it_queues() -> None:
    window = Window(maximum=100, initial=4, waiting_tolerance=0, kv_cache_max=0.9)
    idle = BackendLoad(running=4, waiting=0, kv_cache=0.1)
    assert window.update(idle, inflight=4) == 8  # slow start doubles
    assert window.update(idle, inflight=3) == 8  # not using it all: no growth
    assert window.update(BackendLoad(running=6, waiting=2, kv_cache=0.2), inflight=8) == 6
    assert window.update(idle, inflight=6) == 7  # after congestion, one at a time
    assert window.update(BackendLoad(running=7, waiting=0, kv_cache=0.95), inflight=7) == 7
    # A full KV cache holds the window even while some of it is in transit: no growth, no shrink.
    assert window.update(BackendLoad(running=5, waiting=0, kv_cache=0.95), inflight=5) == 7
    assert window.update(BackendLoad(running=2, waiting=5, kv_cache=None), inflight=7) == 2
    assert window.update(BackendLoad(running=0, waiting=9, kv_cache=None), inflight=2) == 1
    for _ in range(500):
        window.update(idle, inflight=window.size)
    assert window.size == 100
