"""Shared fixtures: per-test work directories under .work/ and throwaway systemd boxes.

* ``work_dir``: a fresh directory under /work/main/.work/ (gitignored), removed after the
  test. Use it instead of tmp_path for anything a systemd box must see: the box's /tmp is
  its own tmpfs.
* ``systemd_box``: a booted SystemdBox (tests/systemd_box.py) for one test; killed after.
* ``systemd_box_module``: one box shared by a module's tests (units must have unique names).

Both box fixtures skip, with the reason, where a box cannot run (not root, no systemd...).
"""
from __future__ import annotations

import re
import shutil
import uuid
from pathlib import Path
from typing import Iterator

import pytest

from systemd_box import REPO_ROOT, SystemdBox, box_unavailable_reason

WORK_ROOT = REPO_ROOT / ".work"


def _fresh_dir(label: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", label)[:60]
    path = WORK_ROOT / f"{safe}-{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def module_home(request: pytest.FixtureRequest) -> Iterator[Path]:
    """A FLUXGYM_HOME shared by one module's runs (outside /tmp: the box must see it)."""
    path = _fresh_dir(f"home-{request.module.__name__}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def work_dir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = _fresh_dir(request.node.name)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _booted_box(label: str) -> Iterator[SystemdBox]:
    """A started box under .work/LABEL, always killed and removed afterwards."""
    reason = box_unavailable_reason()
    if reason:
        pytest.skip(reason)
    path = _fresh_dir(label)
    box = SystemdBox(path / "box")
    try:
        box.start()
        yield box
    finally:
        box.kill()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def systemd_box(request: pytest.FixtureRequest) -> Iterator[SystemdBox]:
    yield from _booted_box(f"box-{request.node.name}")


@pytest.fixture(scope="module")
def systemd_box_module(request: pytest.FixtureRequest) -> Iterator[SystemdBox]:
    yield from _booted_box(f"box-{request.module.__name__}")
