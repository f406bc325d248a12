"""Reload: what a SIGHUP (or a watched file changing) does to a running daemon.

A live stage declares what a reload may change in it, within one section of
the configuration: ``LIVE_KEYS``, the keys it applies when their value changes,
and ``FILE_KEYS``, keys naming files it re-reads on every reload (certificates,
tokens, credentials). It implements one ``async reconfigure(section)``, called
with its section of the configuration the reload arrives at; it reads files off
the event loop (``forwarder.reading``) and raises to keep what is in force.

The composition root lists its stages; ``Reload`` builds the table of live keys
from their declarations and walks them. Every other key is reported as needing
a restart. Whatever goes wrong (a file that cannot be read, a value out of
range, an exception nobody foresaw) is one ``reload_failed`` line with its
cause, and the daemon keeps serving with what was in force.
"""

from __future__ import annotations

import asyncio
from dataclasses import fields
from typing import Any, Callable, Iterable, Protocol

from forwarder import config as config_mod
from forwarder.config import Config, ConfigError
from forwarder.reading import OffLoop


class Live(Protocol):
    """A stage a reload walks."""

    LIVE_KEYS: tuple[str, ...]  # dotted keys it applies, all in one section

    async def reconfigure(self, section: Any) -> None:
        """Apply ``section`` (its keys' section of the new configuration); raise to keep what is in force."""


def file_keys(stage: Live) -> tuple[str, ...]:
    """The keys naming files the stage re-reads on every reload (``FILE_KEYS``, none when undeclared)."""
    return tuple(getattr(stage, "FILE_KEYS", ()))


def section_of(stage: Live) -> str:
    """The one configuration section a stage's keys belong to."""
    sections = {key.partition(".")[0] for key in (*stage.LIVE_KEYS, *file_keys(stage))}
    if len(sections) != 1:
        raise ValueError(f"{type(stage).__name__} must declare keys of exactly one section, got {sorted(sections)}")
    return sections.pop()


def live_table(stages: Iterable[Live]) -> dict[str, str]:
    """Each live key -> the name of the stage that applies it, checked against the configuration's keys."""
    known = {f"{s.name}.{k.name}" for s in fields(Config) for k in fields(s.default_factory)}  # type: ignore[misc]
    table: dict[str, str] = {}
    for stage in stages:
        section_of(stage)
        name = type(stage).__name__
        for key in (*stage.LIVE_KEYS, *file_keys(stage)):
            if key not in known:
                raise ValueError(f"{name} declares {key}, which is no configuration key")
        for key in stage.LIVE_KEYS:
            if key in table:
                raise ValueError(f"{key} is declared live by both {table[key]} and {name}")
            table[key] = name
    return table


def describe(error: BaseException) -> str:
    """An exception as the words of a log line: its message, with its class when it is not ours."""
    if isinstance(error, (ConfigError, OSError)) and str(error):
        return str(error)[:1000]
    return f"{type(error).__name__}: {error}"[:1000]


class Reload:
    """The running configuration and the walk that changes it: one entry point for SIGHUP and watchers."""

    def __init__(self, config: Config, path: str | None, stages: Callable[[], Iterable[Live]], log: Any,
                 reads: OffLoop | None = None, load: Callable[[str], Config] | None = None) -> None:
        self.config = config
        self._path = path
        self._stages = stages
        self._log = log
        self._reads = reads or OffLoop(f"config file {path}")
        # Validated as at start; a reload never waits for a FIFO's writer.
        self._load = load or (lambda p: config_mod.load(p, regular_only=True))
        self._lock = asyncio.Lock()  # a SIGHUP and a watcher never walk at once

    def table(self) -> dict[str, str]:
        """Each live key -> the stage that applies it (what config.example.toml marks "(live)")."""
        return live_table(self._stages())

    def files(self) -> list[str]:
        """The paths the stages re-read on every reload (their FILE_KEYS' values in force): what to watch."""
        paths = []
        for stage in self._stages():
            section = getattr(self.config, section_of(stage)) if file_keys(stage) else None
            paths += [getattr(section, key.partition(".")[2]) for key in file_keys(stage)]
        return [p for p in dict.fromkeys(paths) if p]

    async def reload(self) -> Config:
        """Re-read the configuration file and every stage's files; apply the live keys, report the others."""
        async with self._lock:
            try:
                return await self._walk(await self._read())
            except Exception as e:  # a bug in the walk itself: the daemon keeps what it runs with
                self._log.error("reload_failed", error=describe(e), kept="the running configuration")
                return self.config

    async def reload_files(self) -> None:
        """Re-read the stages' files (certificates, tokens, credentials) with the configuration in force."""
        async with self._lock:
            try:
                await self._walk(None)
            except Exception as e:
                self._log.error("reload_failed", error=describe(e), kept="the files in force")

    async def _read(self) -> Config | None:
        """The configuration file's new content, or None (no file, or one that cannot be used: logged)."""
        if self._path is None:
            self._log.warning("reload_ignored", reason="no configuration file")
            return None
        path = self._path
        try:
            return await self._reads.run(lambda: self._load(path))
        except Exception as e:  # ConfigError, ReadTimeout, or what nobody foresaw: never the daemon's end
            self._log.error("reload_failed", path=path, error=describe(e), kept="the running configuration")
            return None

    async def _walk(self, new: Config | None) -> Config:
        stages = list(self._stages())
        table = live_table(stages)
        changed = [] if new is None else config_mod.changed_keys(self.config, new)
        applied: list[str] = []
        for stage in stages:
            keys = [k for k in changed if k in stage.LIVE_KEYS]
            if not keys and not file_keys(stage):
                continue
            target = self.config if new is None else config_mod.merge_live(self.config, new, keys)
            try:
                await stage.reconfigure(getattr(target, section_of(stage)))
            except Exception as e:
                self._log.error("reload_failed", keys=keys or list(file_keys(stage)), error=describe(e),
                                kept="the values in force")
                continue
            applied += keys
        if new is not None:
            applied = [k for k in changed if k in applied]  # in the configuration's order
            self.config = config_mod.merge_live(self.config, new, applied)
            restart = [k for k in changed if k not in table]
            self._log.info("reloaded", applied=applied, needs_restart=restart)
            if restart:
                self._log.warning("config_needs_restart", keys=restart)
        return self.config
