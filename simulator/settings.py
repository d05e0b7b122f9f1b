"""Configuration of the simulator, read from ``SIMULATOR_*`` environment variables.

The defaults describe a small, fast model so that ``make run`` and the tests
get answers in milliseconds; benchmarks raise the latencies to look like a GPU.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class SimulatorSettings(BaseSettings):
    """Names are the environment variables without their ``SIMULATOR_`` prefix."""

    model_config = SettingsConfigDict(env_prefix="SIMULATOR_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: str = "demo-model"
    """The primary served name (vLLM's first ``--served-model-name``); a name not served gets vLLM's 404."""
    aliases: str = ""
    """More names of the same model (vLLM's other ``--served-model-name`` values), space or comma apart."""
    root: str = ""
    """The model's path, each base name's ``root`` in ``/v1/models``; empty: the primary name."""
    lora_modules: str = ""
    """LoRA adapters as vLLM's ``--lora-modules``: ``name=path`` pairs, space or comma separated;
    each is listed with ``parent`` the primary name and answered under its own name."""
    allow_runtime_lora_updating: bool = False
    """As vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``: serve ``/v1/load_lora_adapter`` and
    ``/v1/unload_lora_adapter`` (``{"lora_name", "lora_path"}``)."""
    max_model_len: int = Field(4096, ge=1)
    """Prompt plus completion tokens allowed per request, as vLLM's ``--max-model-len``."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences generated at once, as vLLM's ``--max-num-seqs``; the rest wait."""
    ttft_ms: float = Field(20.0, ge=0)
    """From being scheduled to the first token."""
    itl_ms: float = Field(10.0, ge=0)
    """Between two tokens of one sequence."""
    default_max_tokens: int = Field(16, ge=1)
    """Completion length when a request sets no ``max_tokens``."""
    scheduling_policy: Literal["fcfs", "priority"] = "fcfs"
    """As vLLM's ``--scheduling-policy``: ``priority`` orders waiting requests by their ``priority``."""
    health_delay_ms: float = Field(0.0, ge=0)
    """How long ``/health`` takes to answer while a sequence runs, as a busy vLLM API server's does."""
    log_level: str = "warning"
