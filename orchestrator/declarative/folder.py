"""The YAML definitions of a folder: loaded all or nothing, checked against the sagas that run, reloaded on change."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from ruamel.yaml import YAML

from orchestrator import store
from orchestrator.declarative.compiler import (
    _MAX_FILE_BYTES,
    DefinitionFileError,
    LoadedDefinition,
    Problem,
    _too_many_brackets,
    compile_file,
)
from orchestrator.definition import DefinitionRegistry, SagaDefinition
from svckit.db import Database

__all__ = ["DefinitionFolder", "compile_files"]

log = logging.getLogger("sagasuite.orchestrator.definitions")

_MISSING_CHILD = "is loaded"  # the tail of the compiler's message for a child not loaded yet (is not loaded)


def _definition_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.iterdir() if path.suffix in (".yaml", ".yml") and path.is_file())


def compile_files(
    paths: Iterable[Path],
    known: Mapping[tuple[str, int], SagaDefinition],
    *,
    environ: Mapping[str, str] | None = None,
    resolve_address: Callable[[str], str | None] | None = None,
) -> list[LoadedDefinition]:
    """Compile files in the order their children need; DefinitionFileError with every problem of every file."""
    pending = list(paths)
    # A child defined by one of these files is taken from it, not from what is registered now.
    defined_here = {key for key in map(_declared_key, pending) if key is not None}
    outside = {key: definition for key, definition in known.items() if key not in defined_here}
    loaded: list[LoadedDefinition] = []
    failures: dict[Path, DefinitionFileError] = {}
    while pending:
        progress = False
        for path in list(pending):
            children = {**outside, **{(d.definition.name, d.definition.version): d.definition for d in loaded}}
            try:
                loaded.append(compile_file(path, children=children, environ=environ, resolve_address=resolve_address))
            except DefinitionFileError as error:
                failures[path] = error
                if not _only_missing_children(error):
                    pending.remove(path)  # a file later in the folder cannot mend this one
                continue
            failures.pop(path, None)
            pending.remove(path)
            progress = True
        if not progress:
            break
    problems = [problem for error in failures.values() for problem in error.problems]
    seen: dict[tuple[str, int], Path] = {}
    for item in loaded:
        key = (item.definition.name, item.definition.version)
        if key in seen:
            problems.append(
                Problem(
                    str(item.path),
                    *item.version_at,
                    f"{key[0]} v{key[1]} is defined in {seen[key]} already",
                    "one file per definition version: give this one a new version",
                )
            )
        seen[key] = item.path
    if problems:
        raise DefinitionFileError(problems)
    return loaded


def _declared_key(path: Path) -> tuple[str, int] | None:
    """The name and version a file declares, read without compiling it (None when it cannot be read)."""
    try:
        # The compiler's own bounds first: YAML is read slowly, and a file it refuses unread is not read here.
        if path.stat().st_size > _MAX_FILE_BYTES:
            return None
        text = path.read_text(encoding="utf-8")
        if _too_many_brackets(text) is not None:
            return None
        head = YAML(typ="safe").load(text).get("document", {})
        return str(head["name"]), int(head["version"])
    except Exception:  # the compile that follows reports what is wrong with it
        return None


def _only_missing_children(error: DefinitionFileError) -> bool:
    return all(problem.message.endswith(_MISSING_CHILD) for problem in error.problems)


class DefinitionFolder:
    """SAGA_DEFINITIONS_DIR: every *.yaml file is one definition version; a failed load registers nothing.

    A file whose content changed keeps its place only if no saga still runs on the version as it
    was: a running saga keeps the contract and definition it started with. A file removed leaves its
    definition registered until a restart, so the sagas on it can finish.
    """

    def __init__(
        self,
        folder: Path,
        registry: DefinitionRegistry,
        database: Database,
        *,
        environ: Mapping[str, str] | None = None,
        resolve_address: Callable[[str], str | None] | None = None,
        on_loaded: Callable[[list[LoadedDefinition]], None] | None = None,
    ) -> None:
        self.folder = folder
        self._registry = registry
        self._database = database
        self._environ = environ
        self._resolve_address = resolve_address
        self.on_loaded = on_loaded
        self._stamp: dict[Path, tuple[int, int]] = {}
        self._failed_stamp: dict[Path, tuple[int, int]] = {}
        self._reload = asyncio.Event()
        self.loaded: dict[tuple[str, int], LoadedDefinition] = {}
        self.last_problems: list[Problem] = []

    def _stamps(self) -> dict[Path, tuple[int, int]]:
        stamps = {}
        for path in _definition_files(self.folder):
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps[path] = (stat.st_mtime_ns, stat.st_size)
        return stamps

    def load(self) -> list[LoadedDefinition]:
        """Compile every file, check it against the sagas running, then register all; returns the new or changed."""
        if not self.folder.is_dir():
            raise DefinitionFileError([Problem(str(self.folder), 1, 1, "SAGA_DEFINITIONS_DIR is not a folder")])
        stamps = self._stamps()
        known = {(d.name, d.version): d for d in self._registry.all()}
        compiled = compile_files(stamps, known, environ=self._environ, resolve_address=self._resolve_address)
        changed = [item for item in compiled if self._changes(item)]
        problems = self._check_running(changed)
        if problems:
            raise DefinitionFileError(problems)
        for item in changed:
            self._registry.replace(item.definition)
        for item in compiled:
            self.loaded[(item.definition.name, item.definition.version)] = item
        self._stamp = stamps
        self.last_problems = []
        if changed and self.on_loaded is not None:
            self.on_loaded(changed)
        return changed

    def _changes(self, item: LoadedDefinition) -> bool:
        current = self._registry.find(item.definition.name, item.definition.version)
        return current is None or current.fingerprint != item.definition.fingerprint

    def _check_running(self, changed: list[LoadedDefinition]) -> list[Problem]:
        def work(connection):  # type: ignore[no-untyped-def]
            return {
                (d.definition.name, d.definition.version): store.running_hashes(
                    connection, d.definition.name, d.definition.version
                )
                for d in changed
            }

        running = self._database.transaction_sync(work) if changed else {}
        problems = []
        for item in changed:
            definition = item.definition
            others = {
                hashes: count
                for hashes, count in running[(definition.name, definition.version)].items()
                if hashes != (definition.contract_hash, definition.fingerprint)
            }
            if others:
                count = sum(others.values())
                contract, fingerprint = next(iter(others))
                started_on = f"definition {fingerprint[:12]}" if fingerprint else "its Python definition"
                problems.append(
                    Problem(
                        str(item.path),
                        *item.version_at,
                        f"{count} saga(s) still run on {definition.name} v{definition.version} as it was "
                        f"({started_on}, contract {contract[:12] or 'unrecorded'}); this file changes it",
                        f"give the change a new version ({definition.version + 1}); running sagas keep theirs",
                    )
                )
        return problems

    def request_reload(self) -> None:
        """Reload at the next chance (SIGHUP)."""
        self._reload.set()

    async def watch(self, interval: float) -> None:
        """Reload when a file is added, changed or removed, or on request; a failed reload keeps the set in force."""
        while True:
            try:
                await asyncio.wait_for(self._reload.wait(), timeout=interval)
            except TimeoutError:
                pass
            requested = self._reload.is_set()
            self._reload.clear()
            try:
                stamps = self._stamps()
                if not requested and stamps in (self._stamp, self._failed_stamp):
                    continue
                changed = await asyncio.to_thread(self.load)
            except DefinitionFileError as error:
                self._failed_stamp = stamps
                if error.problems != self.last_problems:
                    self.last_problems = error.problems
                    log.error(
                        "definitions in %s not reloaded; the set in force stays as it was:\n%s", self.folder, error
                    )
                continue
            except Exception:
                log.exception("reloading the definitions of %s failed; the set in force stays as it was", self.folder)
                continue
            if changed:
                log.info(
                    "definitions reloaded from %s: %s",
                    self.folder,
                    ", ".join(f"{d.definition.name} v{d.definition.version}" for d in changed),
                )
