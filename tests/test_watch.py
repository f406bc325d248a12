"""forwarder/watch.py: which changes on disk are noticed, and the polling task's lifecycle."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from forwarder.watch import FileWatch
from tests.certificates import kubernetes_secret_volume, swap_secret_volume


class Recorder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    async def __call__(self, paths: list[str]) -> None:
        self.calls.append(paths)


def replace(path: Path, text: str) -> None:
    """Write a new version and rename it over ``path``, as cert-manager or a deploy script does."""
    temporary = path.with_name(path.name + ".new")
    temporary.write_text(text)
    os.replace(temporary, path)


def test_unchanged_files_are_not_reported(tmp_path: Path) -> None:
    (tmp_path / "tls.crt").write_text("one")
    changes = Recorder()
    watch = FileWatch([str(tmp_path / "tls.crt")], changes)
    assert watch.poll() == [] and watch.poll() == []
    assert changes.calls == []


def test_a_file_replaced_by_rename_is_reported_once_with_every_path_that_changed(tmp_path: Path) -> None:
    cert, key, tokens = tmp_path / "tls.crt", tmp_path / "tls.key", tmp_path / "tokens"
    for path in (cert, key, tokens):
        path.write_text("one")
    changes = Recorder()
    watch = FileWatch([str(cert), str(key), str(tokens)], changes)
    replace(cert, "two")
    replace(key, "two")
    assert watch.poll() == [str(cert), str(key)]
    assert watch.poll() == []


def test_a_file_rewritten_in_place_to_another_size_is_reported(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("one\n")
    changes = Recorder()
    watch = FileWatch([str(tokens)], changes)
    with open(tokens, "a") as f:  # same inode; the size (and mtime) move
        f.write("two\n")
    assert watch.poll() == [str(tokens)]


def test_a_kubernetes_secret_volume_update_by_swapping_the_data_symlink_is_reported(tmp_path: Path) -> None:
    first, second = tmp_path / "first.crt", tmp_path / "second.crt"
    first.write_text("first")
    second.write_text("second")
    paths = kubernetes_secret_volume(tmp_path / "volume", {"tls.crt": first})
    changes = Recorder()
    watch = FileWatch([str(paths["tls.crt"])], changes)
    swap_secret_volume(tmp_path / "volume", {"tls.crt": second})
    assert watch.poll() == [str(paths["tls.crt"])]
    assert paths["tls.crt"].read_text() == "second" and os.path.islink(paths["tls.crt"])


def test_a_file_that_disappears_and_comes_back_is_reported_both_times(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("one")
    changes = Recorder()
    watch = FileWatch([str(tokens)], changes)
    tokens.unlink()
    assert watch.poll() == [str(tokens)]  # the callback's reload fails and keeps the old set
    assert watch.poll() == []
    tokens.write_text("two")
    assert watch.poll() == [str(tokens)]


class Ticks:
    """An injected wait: the watch's interval passes only when the test calls tick()."""

    def __init__(self) -> None:
        self.intervals: list[float] = []
        self._go = asyncio.Event()
        self._waiting = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.intervals.append(seconds)
        self._waiting.set()
        await self._go.wait()
        self._go.clear()

    async def release(self) -> None:
        """Let one interval pass once the watch waits."""
        await self._waiting.wait()
        self._waiting.clear()
        self._go.set()

    async def tick(self) -> None:
        """Let one interval pass; returns once the watch has polled and waits again."""
        await self.release()
        await self._waiting.wait()


async def test_the_task_polls_once_per_interval_until_closed(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("one")
    changes = Recorder()
    ticks = Ticks()
    watch = FileWatch([str(tokens)], changes, interval=1.5, wait=ticks)
    watch.start(on_crash=pytest.fail)
    replace(tokens, "two")
    replace(tokens.with_name("other"), "not watched")
    await asyncio.sleep(0)
    assert changes.calls == []  # nothing before the interval has passed
    await ticks.tick()
    assert changes.calls == [[str(tokens)]]  # awaited once, with the paths that changed
    await ticks.tick()
    assert changes.calls == [[str(tokens)]]  # no change, no call
    await watch.close()
    await watch.close()  # idempotent
    assert ticks.intervals == [1.5, 1.5, 1.5]  # one wait per poll, and none after close


async def test_a_crash_of_the_callback_is_handed_to_on_crash(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("one")
    crashes: list[BaseException] = []
    crashed = asyncio.Event()

    def on_crash(exc: BaseException) -> None:
        crashes.append(exc)
        crashed.set()

    async def broken(paths: list[str]) -> None:
        raise RuntimeError("a bug in the reload walk")

    ticks = Ticks()
    watch = FileWatch([str(tokens)], broken, wait=ticks)
    watch.start(on_crash)
    replace(tokens, "two")
    await ticks.release()
    await asyncio.wait_for(crashed.wait(), 5)
    assert [str(e) for e in crashes] == ["a bug in the reload walk"]
    await watch.close()


async def test_a_watch_without_files_starts_no_task() -> None:
    watch = FileWatch([], Recorder())
    watch.start(on_crash=pytest.fail)
    assert watch._task is None


def test_the_daemon_watches_every_certificate_and_credentials_file_it_reloads_and_nothing_else(tmp_path) -> None:
    from prometheus_client import CollectorRegistry

    from forwarder.app import Forwarder
    from forwarder.config import from_dict
    tokens = tmp_path / "tokens"
    tokens.write_text("a-token-of-twenty-characters\n")
    tokens.chmod(0o600)
    sidecar = from_dict({"intake": {"auth": "token", "token_file": str(tokens), "credentials_file": "/s/unused"},
                         "evidently": {"endpoint_url": "https://central:8080", "client_cert_file": "/c/tls.crt",
                                       "client_key_file": "/c/tls.key"},
                         "dead_letter": {"path": str(tmp_path / "dl.ndjson")}})
    fwd = Forwarder(sidecar, credentials=("k", "s"), registry=CollectorRegistry(), process_metrics=False)
    assert fwd.reloaded_files() == [str(tokens), "/c/tls.crt", "/c/tls.key"]
    plain = Forwarder(from_dict({"dead_letter": {"path": str(tmp_path / "dl.ndjson")}}), credentials=("k", "s"),
                      registry=CollectorRegistry(), process_metrics=False)
    assert plain.reloaded_files() == []
