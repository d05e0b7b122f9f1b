"""The stock database clients (``psql``, ``mysql``), run the way an operator runs them."""

from __future__ import annotations

import subprocess

from sqlalchemy.engine import make_url

from harness.stack import ROOT


def psql(url: str, *args: str) -> str:
    parts = make_url(url)
    command = ["psql", "-X", "-h", parts.host or "127.0.0.1", "-p", str(parts.port or 5432)]
    command += [
        "-U",
        parts.username or "postgres",
        "-d",
        parts.database or "postgres",
        "-v",
        "ON_ERROR_STOP=1",
    ]
    return _run([*command, *args]).stdout


def mysql(url: str, *args: str) -> str:
    parts = make_url(url)
    command = ["mysql", "-h", parts.host or "127.0.0.1", "-P", str(parts.port or 3306)]
    command += ["-u", parts.username or "root", *(["-p" + parts.password] if parts.password else [])]
    result = _run([*command, *args, parts.database or ""])
    # A statement failing inside `SOURCE file` is reported but leaves the exit status 0.
    if any(line.startswith("ERROR ") for line in result.stderr.splitlines()):
        raise AssertionError(f"mysql failed: {result.stderr}")
    return result.stdout


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise AssertionError(f"{command[0]} failed ({result.returncode}): {result.stderr}")
    return result


def apply_scripts(kind: str, url: str, scripts: list[str]) -> None:
    """Apply schema scripts with the stock client of ``kind``."""
    for script in scripts:
        if kind == "postgres":
            psql(url, "-q", "-f", script)
        else:
            mysql(url, "-e", f"SOURCE {script};")


def admin_script(kind: str, url: str, script: str, **params: object) -> str:
    """Run one of ``db-init/<kind>/``'s admin scripts with the stock client, its parameters passed
    the stock way (``psql -v``, a ``SET @...`` before ``SOURCE``), quoted as an operator would."""
    if kind == "postgres":
        args = [arg for key, value in params.items() for arg in ("-v", f"{key}={value}")]
        return psql(url, *args, "-f", f"db-init/postgres/{script}")
    assignments = ", ".join(
        f"@{key}={value}"
        if isinstance(value, int)
        else "@{}='{}'".format(key, str(value).replace("\\", "\\\\").replace("'", "''"))
        for key, value in params.items()
    )
    prefix = f"SET {assignments}; " if assignments else ""
    return mysql(url, "-e", f"{prefix}SOURCE db-init/mysql/{script};")
