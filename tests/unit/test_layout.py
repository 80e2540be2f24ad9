"""The layout's promises, read from the source: one boto3 import, settings read in one place,
dependencies that point one way, small modules."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted([*ROOT.glob("producer/**/*.py"), *ROOT.glob("worker/**/*.py")])


def _imports(path: Path) -> set[str]:
    found = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.MULTILINE)
    return set(found)


def test_one_module_imports_boto3() -> None:
    importers = [p.relative_to(ROOT).as_posix() for p in SOURCES
                 if any(name == "boto3" or name.startswith("boto3.") for name in _imports(p))]
    assert importers == ["producer/s3.py"]


def test_only_the_settings_read_vlmq_settings_from_the_environment() -> None:
    """Workers read ``VLMQ_*`` once, in worker/settings.py (pydantic-settings); the GPU
    supervisor only writes its children's environment."""
    readers = [p.relative_to(ROOT).as_posix() for p in ROOT.glob("worker/**/*.py")
               if re.search(r"(\.get\(|getenv\(|environ\[)\s*[\"']VLMQ_(?!TINY_CACHE)",
                            p.read_text())]
    assert readers == []


def test_dependencies_point_one_way() -> None:
    for path in ROOT.glob("producer/**/*.py"):
        assert not any(name.split(".")[0] == "worker" for name in _imports(path)), path
    for path in ROOT.glob("worker/**/*.py"):
        bad = {n for n in _imports(path) if n in ("producer.client", "producer.aio")}
        assert not bad, f"{path} imports the client face {bad}"


def test_modules_stay_small() -> None:
    big = {p.relative_to(ROOT).as_posix(): n for p in SOURCES
           if (n := len(p.read_text().splitlines())) > 340}
    assert not big, f"split these modules (lines): {big}"
