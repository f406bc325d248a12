"""The test suite's own rules: shared helpers live in support modules, and tests that start processes say so."""

from __future__ import annotations

import ast
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
STARTS_PROCESSES = re.compile(r"\b(ForwarderProcess|EmulatorProcess)\(|\bemulator_process\b")


def modules() -> list[Path]:
    return sorted(TESTS.rglob("test_*.py"))


def test_no_test_module_imports_another_test_module():
    offenders = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            offenders += [f"{path.relative_to(TESTS.parent)} imports {name}" for name in names
                          if name.startswith("tests.") and name.rsplit(".", 1)[-1].startswith("test_")]
    assert offenders == [], "shared helpers belong in tests/support.py (or a stage's support module):\n" + "\n".join(
        offenders)


def test_every_test_that_starts_daemon_processes_is_marked_e2e():
    unmarked = []
    for path in modules():
        tree = ast.parse(path.read_text())
        module_marked = "pytest.mark.e2e" in path.read_text().split("\ndef ", 1)[0].split("\nasync def ", 1)[0]
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or not node.name.startswith("test_"):
                continue
            source = ast.get_source_segment(path.read_text(), node) or ""
            marked = module_marked or any("e2e" in ast.unparse(d) for d in node.decorator_list)
            if STARTS_PROCESSES.search(source) and not marked:
                unmarked.append(f"{path.relative_to(TESTS.parent)}::{node.name}")
    assert unmarked == [], "these start forwarder or emulator processes without @pytest.mark.e2e:\n" + "\n".join(
        unmarked)


def test_package_init_files_are_empty_faces_that_import_nothing():
    packages = TESTS.parent / "forwarder"
    importing = [str(path.relative_to(TESTS.parent)) for path in sorted(packages.rglob("__init__.py"))
                 if any(isinstance(node, (ast.Import, ast.ImportFrom)) for node in ast.parse(path.read_text()).body)]
    assert importing == [], "import from the module that defines a name, not from its package: " + ", ".join(importing)


# Modules every stage may import: they import no stage back (config.py once imported the rate
# limiter, observability.py the retry policy), so the house has no circle and no arrow running up.
FOUNDATION = ("forwarder/config.py", "forwarder/observability.py", "forwarder/region.py", "forwarder/reading.py",
              "forwarder/clock.py", "forwarder/wakeup.py", "forwarder/tasks.py", "forwarder/evidently")
STAGES = ("forwarder.intake", "forwarder.buffer", "forwarder.delivery", "forwarder.app", "forwarder.emulator",
          "forwarder.replay", "forwarder.status", "forwarder.cli")


def test_the_foundation_modules_import_no_stage_at_run_time():
    root = TESTS.parent
    upward = []
    for entry in FOUNDATION:
        for path in sorted((root / entry).rglob("*.py")) if (root / entry).is_dir() else [root / entry]:
            tree = ast.parse(path.read_text())
            for node in tree.body:  # top-level imports only: a TYPE_CHECKING block is not run
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(STAGES):
                    upward.append(f"{path.relative_to(root)} imports {node.module}")
    assert upward == [], "a stage's module imported from below it:\n" + "\n".join(upward)


def test_the_configuration_accepts_exactly_the_rate_controllers_the_sender_ships():
    from forwarder.config import RATE_CONTROLLERS
    from forwarder.delivery.rate import SHIPPED_CONTROLLERS

    assert tuple(SHIPPED_CONTROLLERS) == RATE_CONTROLLERS
