"""Programs from Debian's packages that some tests drive (Chromium, nginx, systemd-analyze)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def require_program(path: Path, how: str) -> None:
    """Skip the test when ``path`` is missing, saying ``how`` to get it; under ``CI`` fail
    instead, so that a green CI run means those tests ran."""
    if path.exists():
        return
    reason = f"{path} is missing: {how}"
    if os.environ.get("CI"):
        pytest.fail(reason)
    pytest.skip(reason)
