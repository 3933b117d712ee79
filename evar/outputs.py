"""The output policy of every EVAR command: what may be written where, checked before any work starts.

    with claim_output(out, "dir", overwrite=args.overwrite, inputs=[model_dir]):
        ...                                  # the work
        save_model_dir(model, out)           # written atomically (evar.files) into the claimed place

A claim refuses, with one line and before anything is loaded or computed:
  - an existing destination, unless `overwrite` (and then only an EVAR output: a model directory, an
    artifact, a report or plot EVAR wrote: never a user's own folder or file) or the command resumes it
    (`resumes`: an EVAR run of the same kind continues where it stopped);
  - special files (/dev/null, pipes, devices), a path inside an existing model directory or artifact, a
    path that is (or holds, or lies inside) one of the command's inputs, the working directory itself;
  - a file where a folder is needed and the reverse, a parent that cannot be written, too little disk;
  - a second run into the same place while the first holds it (an exclusive lock beside the output).
It also removes what killed runs into the same place left behind (hidden temp folders of `atomic_dir`).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from evar.errors import EvarError

Kind = Literal["dir", "file"]
# A folder EVAR made says so: model directories of every family in config.json's `format`, artifacts in
# manifest.json's, every other folder (runs, sample sets) in this file.
OUTPUT_MARKER = "evar-output.json"
PNG_SOFTWARE = "EVAR"  # tEXt "Software" of every PNG EVAR writes (evar.files.figure_png, evar.samples)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class OutputError(EvarError):
    """An output path EVAR will not write to (it would destroy something, or cannot succeed)."""


# ---------------------------------------------------------------- what EVAR made
def _json_format(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(1 << 20))
    except (OSError, ValueError):
        return None
    fmt = data.get("format") if isinstance(data, dict) else None
    return fmt if isinstance(fmt, str) else None


def _json_field(path: Path, key: str) -> str | None:
    try:
        value = json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _png_by_evar(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError:
        return False
    return head.startswith(_PNG_SIGNATURE) and b"tEXtSoftware\x00" + PNG_SOFTWARE.encode() in head


def _dir_kind(path: Path) -> str | None:
    fmt = _json_format(path / "config.json")
    if fmt and fmt.startswith("evar"):
        return "model directory"
    if _json_format(path / "manifest.json") == "evar-artifact":
        return "artifact"
    if _json_format(path / OUTPUT_MARKER) == "evar-output":
        return _json_field(path / OUTPUT_MARKER, "kind") or "EVAR output"
    # outputs of EVAR versions that wrote no marker
    if (path / "tokenizer.json").is_file():
        return "tokenizer"
    if (path / "train_state.pt").is_file() or (path / "train_log.jsonl").is_file():
        return "training run"
    if (path / "REPORT.md").is_file() and (path / "quality").is_dir():
        return "demo run"
    if (path / "samples.npz").is_file() and (path / "grid.png").is_file():
        return "sample set"
    return None


def evar_made(path: Path) -> str | None:
    """What EVAR output `path` is ('model directory', 'artifact', 'report', …), or None if EVAR did not make it."""
    if path.is_dir():
        return _dir_kind(path)
    if path.suffix == ".json":
        fmt = _json_format(path)
        return f"report ({fmt})" if fmt and fmt.startswith("evar") else None
    if path.suffix == ".png":
        return "plot" if _png_by_evar(path) else None
    return None


def mark_output(folder: Path, kind: str, **fields: object) -> None:
    """Say in `folder` that EVAR made it and what it is (so --overwrite and resumes can recognise it)."""
    from evar.files import atomic_write_json

    atomic_write_json(folder / OUTPUT_MARKER, {"format": "evar-output", "kind": kind, **fields})


def _inside_evar_dir(path: Path) -> Path | None:
    """The nearest existing ancestor of `path` that is a model directory or an artifact."""
    for parent in path.parents:
        if parent.is_dir() and evar_made(parent) in ("model directory", "artifact"):
            return parent
    return None


# ---------------------------------------------------------------- the checks
def _is_special(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not (stat.S_ISDIR(mode) or stat.S_ISREG(mode))


def _related(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output(path: str | Path, kind: Kind, *, overwrite: bool = False, resumes: Iterable[str] = (),
                 inputs: Iterable[str | Path | None] = (), need_bytes: int = 0, flag: str = "--out") -> Path:
    """Raise OutputError if writing `path` would destroy something or cannot succeed; return it absolute."""
    raw = Path(path)
    target = Path(os.path.abspath(raw))
    shown = f"{flag} {raw}"
    cwd = Path.cwd()
    if raw.name in ("", ".", "..") or target == cwd or target in cwd.parents:
        raise OutputError(f"{shown} is the working directory or one of its parents; name a new folder or file")
    if os.path.lexists(target) and _is_special(target):
        raise OutputError(f"{shown} is a special file (device, pipe or socket); EVAR writes only regular files "
                          "and folders")
    for given in inputs:
        if given is not None and ":" not in str(given) and _related(target, Path(os.path.abspath(given))):
            raise OutputError(f"{shown} overlaps the input {given}; write the output somewhere else")
    home = _inside_evar_dir(target)
    if home is not None:
        raise OutputError(f"{shown} lies inside the {evar_made(home)} {home}; writing there would break it, "
                          "choose a path outside it")
    if target.exists():
        _check_existing(target, kind, shown, overwrite, tuple(resumes))
    _check_parent(target, shown)
    if need_bytes:
        _check_space(target, shown, need_bytes)
    return target


def _check_existing(target: Path, kind: Kind, shown: str, overwrite: bool, resumes: tuple[str, ...]) -> None:
    is_dir = target.is_dir()
    if kind == "dir" and not is_dir:
        raise OutputError(f"{shown} is a file; this command writes a folder there: name a folder")
    if kind == "file" and is_dir:
        raise OutputError(f"{shown} is a folder; this command writes a file there: name a file")
    if is_dir and not any(target.iterdir()):
        return  # an empty folder holds nothing to lose
    made = evar_made(target)
    if made in resumes:
        return  # a run of this command: its own resume rules decide what happens to it
    if not made:
        raise OutputError(f"{shown} exists and {_contents(target)} EVAR did not write; EVAR replaces only its own "
                          "outputs (model directories, artifacts, reports, plots): choose another path")
    if not overwrite:
        raise OutputError(f"{shown} is an existing {made}; pass --overwrite to replace it, or choose another path")
    if not os.access(target, os.W_OK) or (is_dir and not os.access(target, os.X_OK)):
        raise OutputError(f"{shown} is read-only; make it writable or choose another path")


def _contents(target: Path) -> str:
    if not target.is_dir():
        return "is a file"
    names = sorted(p.name for p in target.iterdir())
    return f"holds files ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"


def _check_parent(target: Path, shown: str) -> None:
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{shown}: {parent} is a file, so no folder can be made below it")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{shown}: cannot write in {parent} (read-only or not yours)")


def check_space(path: str | Path, need_bytes: int, flag: str = "--out") -> None:
    """Refuse before the work when the disk that will hold `path` has less than `need_bytes` free."""
    _check_space(Path(os.path.abspath(path)), f"{flag} {path}", need_bytes)


def _check_space(target: Path, shown: str, need_bytes: int) -> None:
    parent = target.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if free < need_bytes:
        raise OutputError(f"{shown}: {free / 2**20:.0f} MiB free on that disk, about {need_bytes / 2**20:.0f} MiB "
                          "needed; free some space or choose another disk")


# ---------------------------------------------------------------- one writer at a time
def lock_path(target: Path) -> Path:
    return target.parent / f".{target.name}.lock"


@dataclass
class _Lock:
    path: Path
    fd: int
    made: list[Path]  # folders created to hold the lock, deepest first: removed again if still empty

    def release(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # unlinked while still held, so no one can lock a stale inode
        os.close(self.fd)
        for folder in self.made:
            with contextlib.suppress(OSError):
                folder.rmdir()


def _acquire(target: Path, shown: str) -> _Lock:
    path = lock_path(target)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EACCES):
                holder = _lock_holder(path)
                raise OutputError(f"{shown} is being written by another EVAR run{holder}; wait for it to finish "
                                  "or choose another path") from None
            raise
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:  # else the previous holder unlinked it between our open and our lock: take the new one
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            return _Lock(path, fd, made)
        os.close(fd)


def _lock_holder(path: Path) -> str:
    try:
        pid = path.read_text().strip()
    except OSError:
        return ""
    return f" (process {pid})" if pid.isdigit() else ""


def stale_leftovers(target: Path) -> list[Path]:
    """Hidden temp folders/files that interrupted runs into `target` left beside it (`evar.files` names)."""
    parent = target.parent
    if not parent.is_dir():
        return []
    prefixes = (f".{target.name}.tmp-", f".{target.name}.old-", f".{target.name}.")
    return sorted(p for p in parent.iterdir() if p.name.startswith(prefixes) and p != lock_path(target)
                  and not p.name.endswith(".lock"))


def _remove_leftovers(target: Path) -> None:
    for p in stale_leftovers(target):
        size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
        print(f"removing {p} ({size / 2**20:.1f} MiB), left by an interrupted run", file=sys.stderr)
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@contextlib.contextmanager
def claim_output(path: str | Path, kind: Kind, *, overwrite: bool = False, resumes: Iterable[str] = (),
                 inputs: Iterable[str | Path | None] = (), need_bytes: int = 0, flag: str = "--out",
                 progress_note: str | None = None) -> Iterator[Path]:
    """Check `path` (see `check_output`), hold it against other EVAR runs, clear leftovers of killed runs,
    and yield it. `resumes`: kinds of existing EVAR output (`evar_made`) this command continues in place.
    `progress_note` is printed when the run is interrupted (Ctrl-C): where its progress waits."""
    target = check_output(path, kind, overwrite=overwrite, resumes=resumes, inputs=list(inputs),
                          need_bytes=need_bytes, flag=flag)
    lock = _acquire(target, f"{flag} {path}")
    try:
        _remove_leftovers(target)
        yield target
    except KeyboardInterrupt:
        if progress_note:
            print(f"interrupted: {progress_note}; rerun the same command to continue", file=sys.stderr)
        raise
    finally:
        lock.release()
