"""Atomic outputs: a reader never sees a half-written file or directory."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a fresh temp dir beside `target`; on success it replaces `target`, on error it vanishes."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def figure_png(fig: Any, dpi: int = 110) -> bytes:
    """A matplotlib figure as PNG bytes (then closed, so long runs do not pile figures up)."""
    import io

    import matplotlib.pyplot as plt

    from evar.outputs import PNG_SOFTWARE

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": PNG_SOFTWARE})  # --overwrite recognises it
    plt.close(fig)
    return buf.getvalue()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | Path, what: str = "file") -> Any:
    """JSON from `path`, or an EvarError naming the file (missing, unreadable, not JSON)."""
    from evar.errors import EvarError

    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise EvarError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise EvarError(f"{path} is not valid JSON ({what}): {str(err).splitlines()[0]}") from None


def read_versioned_json(path: str | Path, fmt: str, max_version: int, what: str, error: type[Exception]) -> dict[str, Any]:
    """A JSON object whose `format` is `fmt` and whose `format_version` this EVAR reads (1..max_version).
    A newer version is refused before anything else is looked at, so the message says "upgrade"."""
    try:
        data = read_json(path, what)
    except error:
        raise
    except Exception as err:  # the EvarError of read_json, re-raised as the caller's type
        raise error(str(err)) from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise error(f"{path} is not an EVAR {what} (its \"format\" must be '{fmt}')")
    version = data.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise error(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > max_version:
        raise error(f"{path} was written by a newer EVAR (format_version {version}); this EVAR reads format_version "
                    f"{max_version} at most: upgrade EVAR, or re-create the {what} with this version")
    return data


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
