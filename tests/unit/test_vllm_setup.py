"""The real-vLLM set-up's own logic, without installing anything: cache place, markers, command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import vllm_cpu


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("VLLM_CPU_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_lives_outside_the_repository(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("VLLM_CPU_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert vllm_cpu.cache_dir() == tmp_path / "llm-dispatcher" / f"vllm-cpu-{vllm_cpu.VERSION}"


def test_only_completed_parts_are_trusted(cache: Path) -> None:
    assert not vllm_cpu.is_ready()
    vllm_cpu.venv_dir().mkdir(parents=True)
    vllm_cpu.tiny_model_dir().mkdir(parents=True)
    assert not vllm_cpu.is_ready(), "directories left by an interrupted set-up are not enough"
    (vllm_cpu.venv_dir() / ".complete").write_text("done\n")
    (vllm_cpu.tiny_model_dir() / ".complete").write_text("an older recipe\n")
    assert not vllm_cpu.is_ready(), "a model made by another recipe is made again"
    (vllm_cpu.tiny_model_dir() / ".complete").write_text(vllm_cpu._recipe_hash() + "\n")
    assert vllm_cpu.is_ready()
    assert vllm_cpu.setup(say=lambda line: pytest.fail(f"set up again: {line}")) == cache


def test_serve_command_has_what_the_cpu_build_needs(cache: Path) -> None:
    argv, env = vllm_cpu.serve_command(vllm_cpu.tiny_model_dir(), names=["a", "b"], port=1234, max_num_seqs=1)
    assert argv[:4] == [str(vllm_cpu.venv_python()), "-m", "vllm.entrypoints.cli.main", "serve"]
    line = " ".join(argv)
    assert "--served-model-name a b " in line and "--port 1234" in line
    assert "--dtype float32 --enforce-eager --scheduling-policy priority" in line
    assert f"--max-model-len {vllm_cpu.TINY_MAX_MODEL_LEN}" in line and "--max-num-seqs 1" in line
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"]
    assert env["HF_HUB_OFFLINE"] == "1"
    own, _ = vllm_cpu.serve_command(Path("/models/mine"), names=["mine"], port=1)
    assert "--max-model-len" not in own, "another model's length is its own"
