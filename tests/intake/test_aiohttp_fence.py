"""The aiohttp fence: one module reads aiohttp's internals, on the aiohttp versions pyproject.toml allows.

When an aiohttp release moves what forwarder/intake/aiohttp_fence.py reads,
these fail naming the attribute and the installed aiohttp version.
"""

from __future__ import annotations

import asyncio
import re
import tomllib
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from forwarder.intake.aiohttp_fence import HOOKS, PRIVATE_ATTRIBUTES, missing_internals

ROOT = Path(__file__).resolve().parents[2]
FENCE = ROOT / "forwarder" / "intake" / "aiohttp_fence.py"


def aiohttp_bounds() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lowest, first excluded) aiohttp versions of pyproject.toml's dependency."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (spec,) = [d for d in deps if re.match(r"aiohttp\b", d)]
    low = re.search(r">=\s*([\d.]+)", spec)
    high = re.search(r"<\s*([\d.]+)", spec)
    assert low and high, f"pyproject.toml must bound aiohttp on both sides (>=3.x,<3.y), got {spec!r}"
    return tuple(map(int, low.group(1).split("."))), tuple(map(int, high.group(1).split(".")))


def version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_pyproject_bounds_aiohttp_below_the_next_minor_and_the_installed_one_is_within():
    low, high = aiohttp_bounds()
    assert high[:2] == (low[0], low[1] + 1) and len(high) == 2, (
        f"aiohttp's upper bound {high} must be the minor after {low}: its internals move between minors")
    installed = version(aiohttp.__version__)
    assert low <= installed < high, (
        f"aiohttp {aiohttp.__version__} is installed; pyproject.toml allows >= {low}, < {high}")


@pytest.mark.parametrize("name", PRIVATE_ATTRIBUTES)
async def test_every_private_attribute_the_fence_reads_exists_in_the_installed_aiohttp(name):
    assert hasattr(RequestHandler, name), (
        f"aiohttp {aiohttp.__version__} moved RequestHandler.{name}, which forwarder/intake/aiohttp_fence.py reads")
    # And set on a new protocol, not only declared as a slot by the class.
    handler = RequestHandler(web.Server(lambda request: None), loop=asyncio.get_running_loop())
    assert hasattr(handler, name), (
        f"aiohttp {aiohttp.__version__}'s RequestHandler no longer sets {name} in __init__ "
        "(forwarder/intake/aiohttp_fence.py reads it)")


@pytest.mark.parametrize(("owner", "name"), list(HOOKS))
def test_every_aiohttp_hook_the_fence_relies_on_has_the_parameters_it_expects(owner, name):
    assert not [line for line in missing_internals() if f"{owner.__name__}.{name}" in line], (
        f"aiohttp {aiohttp.__version__}: {missing_internals()}")


def test_an_aiohttp_that_moved_an_attribute_is_named_with_its_version():
    class Moved(RequestHandler):
        __slots__ = ()

    class Renamed:  # an aiohttp whose RequestHandler has none of it
        pass

    found = missing_internals(handler=Renamed)
    assert f"aiohttp {aiohttp.__version__} has no RequestHandler._request_in_progress" in found
    assert f"aiohttp {aiohttp.__version__} has no RequestHandler.handle_error" in found
    assert missing_internals(handler=Moved) == []


def test_no_other_module_reads_aiohttp_internals():
    """Only the fence imports aiohttp.web_protocol or names RequestHandler's private attributes."""
    private = re.compile(r"\.(" + "|".join(map(re.escape, PRIVATE_ATTRIBUTES)) + r")\b|aiohttp\.web_protocol"
                         r"|_make_request|\bpre_shutdown\b|\bwriting_paused\b|\boutput_size\b")
    offenders = []
    for path in sorted((ROOT / "forwarder").rglob("*.py")):
        if path == FENCE:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if private.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == [], "aiohttp internals read outside forwarder/intake/aiohttp_fence.py:\n" + "\n".join(offenders)
