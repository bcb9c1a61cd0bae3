"""Where a command may write: one rule for every output folder and file, checked before any work.

lorafit never deletes or overwrites what it did not write. Every folder a command creates as its
output carries a small marker (`.lorafit-output.json`, naming the kind of output); a folder from
before the marker is recognised by the files lorafit writes there. The rule:

- a new path, or an empty folder: written;
- a folder holding the same kind of output lorafit wrote before: refused unless `--overwrite`, which
  replaces lorafit's own files and keeps anything else in it untouched;
- a folder holding another kind of lorafit output (a run folder given to `/save`), or files lorafit
  did not write, or a path that is a file where a folder is wanted: refused, with or without
  `--overwrite`.

Temporary names (staging folders, partial files) start with `.lorafit-tmp-PID-`, so a later
command can tell the leftovers of a killed process from the work of a live one and remove them.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from lorafit import __version__
from lorafit.artifacts import REPORT_FILES, RUN_ENTRIES
from lorafit.errors import UsageError
from lorafit.io import STAGING_PREFIX, UMASK, staging_prefix, write_json_atomic

MARKER = ".lorafit-output.json"
LOCK = ".lorafit-lock"


def _json_file(path: Path) -> dict:
    try:
        return _json_text(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # a missing or non-UTF-8 file tells nothing
        return {}


@dataclass(frozen=True)
class OutputKind:
    """A kind of output folder: what to call it, the entries lorafit writes into it, and how to
    recognise one written before folders carried the marker."""

    name: str
    label: str
    entries: tuple[str, ...]  # top-level names (fnmatch patterns) that lorafit writes
    signature: Callable[[Path], bool]


def _is_run(folder: Path) -> bool:
    return (folder / "config.yaml").is_file() and any(
        (folder / name).exists() for name in ("metrics.jsonl", "summary.json", "checkpoints")
    )


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file() and (folder / "lorafit.json").is_file()


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "lorafit.json").is_file()


def _is_report(folder: Path) -> bool:
    return "report_version" in _json_file(folder / "report.json")


def _is_prepared(folder: Path) -> bool:
    return "documents_kept" in _json_file(folder / "stats.json")


TOKENIZER_ENTRIES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "tokenizer.model",
)
KINDS = {
    kind.name: kind
    for kind in (
        OutputKind(
            "run",
            "a run folder",
            RUN_ENTRIES,
            _is_run,
        ),
        OutputKind(
            "adapter",
            "an adapter",
            ("adapter_config.json", "adapter_model.safetensors", "README.md", "lorafit.json"),
            _is_adapter,
        ),
        OutputKind(
            "model",
            "a model folder",
            ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "lorafit.json")
            + TOKENIZER_ENTRIES,
            _is_model,
        ),
        OutputKind("report", "a report", (*REPORT_FILES, "tasks.json"), _is_report),
        OutputKind("prepared", "prepared data", ("train.jsonl", "valid.jsonl", "stats.json"), _is_prepared),
    )
}


def recognise(folder: Path) -> str | None:
    """The kind of lorafit output `folder` holds (by its marker, else by its files), or None."""
    marked = _json_file(folder / MARKER).get("kind")
    if marked in KINDS:
        return marked
    for kind in KINDS.values():
        if kind.signature(folder):
            return kind.name
    return None


def _lorafit_bookkeeping(name: str) -> bool:
    return name in (MARKER, LOCK) or name.startswith(STAGING_PREFIX)


def foreign_entries(folder: Path, kind: str) -> list[str]:
    """Top-level entries of `folder` that lorafit does not write for `kind` (the user's own)."""
    patterns = KINDS[kind].entries
    return sorted(
        entry.name
        for entry in folder.iterdir()
        if not _lorafit_bookkeeping(entry.name) and not any(fnmatch.fnmatch(entry.name, p) for p in patterns)
    )


def _listing(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def _check_parents(path: Path, option: str) -> None:
    """The nearest existing ancestor of `path` must be a folder (`afile/sub` cannot be made)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"{option} {path}: {parent} is a file, not a folder; choose another path.")
            return


def check_output_folder(path: Path, kind: str, overwrite: bool, option: str = "--out") -> None:
    """Refuse, before any work, an output folder this command may not write (see the module's
    rule). Returns normally for a new path, an empty folder, or a previous output of the same
    kind with `overwrite`."""
    path = Path(path)
    label = KINDS[kind].label
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {path} is a file, not a folder; give a new folder path for {label}.")
    _check_parents(path, option)
    if not path.is_dir() or all(_lorafit_bookkeeping(entry.name) for entry in path.iterdir()):
        return  # new, empty, or holding only what an earlier attempt of lorafit's set up
    found = recognise(path)
    if found is None:
        theirs = foreign_entries(path, kind) or sorted(entry.name for entry in path.iterdir())
        raise UsageError(
            f"{option} {path} already holds files lorafit did not write ({_listing(theirs)}); lorafit never "
            f"replaces them, even with --overwrite: choose a new or empty folder for {label}."
        )
    if found != kind:
        raise UsageError(
            f"{option} {path} holds {KINDS[found].label} written by lorafit, not {label}; choose another "
            f"folder (--overwrite replaces only a previous {label.split(' ', 1)[1]})."
        )
    if not overwrite:
        raise UsageError(
            f"{option} {path} already holds {label} written by lorafit; choose another folder, or pass "
            "--overwrite to replace it (files lorafit did not write are kept)."
        )


def mark_output_folder(path: Path, kind: str) -> None:
    """Create `path` (if needed) and record that lorafit writes `kind` there."""
    path.mkdir(parents=True, exist_ok=True)
    if _json_file(path / MARKER).get("kind") != kind:
        write_json_atomic(path / MARKER, {"kind": kind, "lorafit_version": __version__})


@contextlib.contextmanager
def output_folder(
    path: Path, kind: str, command: str, option: str = "--out", disposable: tuple[str, ...] = ()
) -> Iterator[Path]:
    """Mark and lock `path` while a command writes `kind` into it (checked already). A command that
    fails leaves no trace: a folder it created, still empty of outputs (but the `disposable`
    entries: intermediate files it can make again), is removed again."""
    path = Path(path)
    created = not path.exists()
    mark_output_folder(path, kind)
    try:
        with folder_lock(path, command, option):
            yield path
    except BaseException:
        leftovers = [entry for entry in path.iterdir() if entry.name not in (MARKER, LOCK, *disposable)]
        if not leftovers and path.is_dir():
            if created:
                shutil.rmtree(path, ignore_errors=True)
            else:  # it held nothing but lorafit's bookkeeping: leave it as empty as it was
                for name in (MARKER, LOCK):
                    (path / name).unlink(missing_ok=True)
        raise


def remove_own_entries(path: Path, kind: str, names: tuple[str, ...] | None = None) -> None:
    """Delete what lorafit wrote into `path` for `kind` (all of it, or only `names`), nothing else."""
    patterns = names if names is not None else KINDS[kind].entries
    for entry in list(path.iterdir()):
        if any(fnmatch.fnmatch(entry.name, p) for p in patterns):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()


def check_output_file(path: Path, overwrite: bool, written_by_lorafit: Callable[[Path], bool], option: str) -> None:
    """The file counterpart of `check_output_folder`: a folder, a file lorafit did not write, or an
    existing output without `overwrite` is refused before any work."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder; give a file path.")
    _check_parents(path, option)
    if not path.exists():
        return
    if not written_by_lorafit(path):
        raise UsageError(
            f"{option} {path} exists and was not written by lorafit; lorafit never replaces it, even with "
            "--overwrite: choose another file name."
        )
    if not overwrite:
        raise UsageError(f"{option} {path} exists; choose another file name, or pass --overwrite to replace it.")


# -- temporary names ------------------------------------------------------------------------------


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(folder: Path) -> list[Path]:
    """Remove temporary entries in `folder` left by lorafit processes that no longer run (a
    SIGKILL, a power cut); returns what was removed."""
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if not entry.name.startswith(STAGING_PREFIX):
            continue
        pid_text = entry.name[len(STAGING_PREFIX) :].split("-", 1)[0]
        if not pid_text.isdigit() or int(pid_text) == os.getpid() or _process_alive(int(pid_text)):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


# -- one process per output folder ---------------------------------------------------------------


@contextlib.contextmanager
def folder_lock(folder: Path, command: str, option: str = "--out") -> Iterator[None]:
    """Hold an exclusive lock on `folder` while a command writes it. The kernel releases the lock
    when its process ends however it ends, so a lock left by a killed process never blocks."""
    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+", encoding="utf-8")  # noqa: SIM115 (held until the context ends)
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _json_text(handle.read())
            who = f"pid {holder.get('pid', '?')}, {holder.get('command', 'lorafit')}, since {holder.get('since', '?')}"
            raise UsageError(
                f"{option} {folder} is in use by another lorafit process ({who}); wait for it to finish or "
                "stop it, or choose another folder."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "command": command, "since": time.strftime("%Y-%m-%d %H:%M:%S")}))
        handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


def _json_text(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


@contextlib.contextmanager
def cache_lock(path: Path) -> Iterator[None]:
    """Wait for an exclusive lock on a cache entry (two processes converting one model take turns;
    the second then finds the first one's result)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        yield


def fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk."""
    for path in Path(folder).rglob("*"):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())


def write_folder_atomically(out_dir: Path, write: Callable[[Path], None], kind: str | None = None) -> Path:
    """Fill a temporary sibling folder with `write`, fsync it, then rename it into place (never
    half-written, even after a power cut).

    With `kind` (a command's own output, not a part of a run folder) the folder is marked as that
    kind of lorafit output, and whatever the user keeps in a replaced folder moves into the new one:
    only lorafit's own files are replaced (the caller has checked the folder with
    `check_output_folder`)."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)
    staging = Path(tempfile.mkdtemp(prefix=staging_prefix(out_dir.name), dir=out_dir.parent))
    os.chmod(staging, 0o777 & ~UMASK)  # mkdtemp's 0700 would hide a shared output from others
    # Not a temporary name: if the process dies between the renames, the old folder (and anything
    # of the user's in it) stays where it is, never swept away.
    backup = out_dir.with_name(f".lorafit-replaced-{os.getpid()}-{out_dir.name}")
    try:
        write(staging)
        if kind is not None:
            mark_output_folder(staging, kind)
        fsync_tree(staging)  # on disk before the rename makes it the real one (a crash keeps the old)
        if out_dir.exists():
            os.rename(out_dir, backup)
            os.rename(staging, out_dir)
            if kind is not None:
                for name in foreign_entries(backup, kind):
                    os.rename(backup / name, out_dir / name)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir
