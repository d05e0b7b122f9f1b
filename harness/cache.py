"""What the cached set-ups of the harness (vLLM's CPU build, RabbitMQ 4.3, Open WebUI) share.

Each installs something large once per machine into a directory outside the
repository, ``${XDG_CACHE_HOME:-~/.cache}/llm-dispatcher/<name>-<version>``,
which an environment variable of its own moves. Installs take minutes and may
be killed half-way, so a part is trusted only once a :data:`COMPLETE` marker
file is written into it, last; and two test runs on one machine may set up at
once, so each set-up holds the directory's lock (:func:`locked`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

COMPLETE = ".complete"
"""The marker written into a part once it is finished; a part without it is made again."""
_LOG_TAIL_LINES = 25


class SetupError(RuntimeError):
    """A cached set-up could not be made on this machine; the message says why.

    The tests that need it fail with this message rather than being skipped.
    """


def directory(variable: str, name: str) -> Path:
    """``$variable`` if set, else ``name`` under the machine's cache: shared by every checkout and run."""
    if os.environ.get(variable):
        return Path(os.environ[variable])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "llm-dispatcher" / name


@contextlib.contextmanager
def locked(directory: Path, timeout: float) -> Iterator[None]:
    """Hold ``directory``'s set-up lock, waiting up to ``timeout`` seconds for another process's.

    A lock on a file (not the file's existence) goes away with a process that is
    killed, so a dead set-up never blocks the next one.
    """
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / ".lock"
    with path.open("w") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SetupError(f"another process has held {path} for {timeout:.0f} s") from None
                time.sleep(0.5)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_step(
    argv: list[str], what: str, log: Path, timeout: float, env: dict[str, str] | None = None
) -> None:
    """Run one set-up step, its output appended to ``log``; fail with the log's tail.

    Installs print far too much to show, but when one fails its last lines are
    what explains it, so the error carries them and names the whole log.
    """
    with log.open("ab") as out:
        out.write(f"\n$ {' '.join(argv)}\n".encode())
        out.flush()
        try:
            result = subprocess.run(
                argv, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False, env=env
            )
        except subprocess.TimeoutExpired:
            raise SetupError(f"{what} took more than {timeout:.0f} s; its output is in {log}") from None
        except OSError as exc:
            raise SetupError(f"{what} could not run: {exc}") from None
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-_LOG_TAIL_LINES:])
        raise SetupError(f"{what} failed (exit {result.returncode}); the end of {log}:\n{tail}")


def apt_install(packages: list[str], log: Path) -> None:
    """``apt-get install`` the machine packages a set-up needs, its output appended to ``log``.

    A fresh machine's package lists may be missing or stale, so a failed
    install is tried once more after ``apt-get update``. Whether it worked is
    for the caller to check (it knows which files it needs).
    """
    install = ["apt-get", "install", "-y", "--no-install-recommends", *packages]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with log.open("ab") as out:
        if subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env, check=False).returncode:
            subprocess.run(["apt-get", "update"], stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
            subprocess.run(install, stdout=out, stderr=subprocess.STDOUT, env=env, check=False)
