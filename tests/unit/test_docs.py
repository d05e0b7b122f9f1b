"""The architecture map stays true: every file and folder it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_path_the_architecture_page_names_exists() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`([a-z_]+/[A-Za-z0-9_./<>-]*)`", text))
    assert len(named) > 30
    missing = sorted(
        path
        for path in named
        if "<" not in path and "*" not in path and not any(ROOT.glob(path.rstrip("/").replace("0NN", "0??")))
    )
    assert missing == []


def test_every_service_module_is_on_the_map() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    modules = [
        f"{path.parent.name}/{path.name}"
        for package in ("sender", "consumer", "contract")
        for path in (ROOT / package).glob("*.py")
        if path.name != "__init__.py"
    ]
    unmapped = [module for module in modules if module not in text]
    assert unmapped == []
