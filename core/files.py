"""Safe file writing: checked output paths and atomic writes that never leave half-written files."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from .errors import InputError


def check_output_path(path: Path, overwrite: bool) -> Path:
    """Check that a file can be written at `path`; raise InputError naming the path and the fix if not."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise InputError(f"output {path}: is a folder; give a file name inside it")
    if path.exists() and not overwrite:
        raise InputError(f"output {path}: exists; pass --overwrite or choose another name")
    parent = path.parent
    if not parent.exists():
        raise InputError(f"output {path}: folder {parent} does not exist; create it first or choose another folder")
    if not parent.is_dir():
        raise InputError(f"output {path}: {parent} is a file, not a folder; choose a path inside a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"output {path}: folder {parent} is not writable; choose a folder you can write to")
    return path


def _new_temp_path(path: Path) -> Path:
    """Create an empty, uniquely named hidden temp file next to `path` and return its path."""
    for _ in range(100):
        candidate = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise InputError(f"output {path}: could not create a temporary file next to it; clear old .tmp files there")


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (else by a brief set-and-restore)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(path: Path) -> None:
    """Give a written file the mode a plain open() would (0666 less the umask): writers such as safetensors use 0600."""
    with contextlib.suppress(OSError):  # filesystems without POSIX modes
        os.chmod(path, 0o666 & ~current_umask())


def _fsync_file(path: Path) -> None:
    """Flush a written file's data to disk."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(folder: Path) -> None:
    """Flush a folder entry to disk where the platform allows it (best effort)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _publish(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished temp file onto `path`; without overwrite, never replace a file that appeared meanwhile."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic: fails if `path` exists by now
    except FileExistsError:
        raise InputError(f"output {path}: exists; pass --overwrite or choose another name") from None
    except OSError:
        # No hard links on this filesystem: check again at the last moment, then move.
        if path.exists():
            raise InputError(f"output {path}: exists; pass --overwrite or choose another name") from None
        os.replace(tmp, path)
        return
    tmp.unlink()


def atomic_write(path: Path, write: Callable[[Path], None], overwrite: bool) -> Path:
    """Write a file via `write(tmp_path)` into a hidden temp file, fsync it, then move it onto `path`."""
    path = check_output_path(path, overwrite)
    tmp: Path | None = None
    try:
        tmp = _new_temp_path(path)
        write(tmp)
        _follow_umask(tmp)
        _fsync_file(tmp)
        _publish(tmp, path, overwrite)
        _fsync_dir(path.parent)
    except PermissionError as error:
        raise InputError(
            f"output {path}: permission denied ({error.strerror}); choose a folder you can write to"
        ) from error
    except OSError as error:
        raise InputError(
            f"output {path}: could not write it ({error.strerror or error}); check the disk and folder"
        ) from error
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    return path


def make_parent(path: Path, flag: str = "--out") -> Path:
    """Create the folder a file will be written to (like `train` does), or an InputError naming the flag."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"{flag}: cannot create folder {Path(path).parent} ({error.strerror}); choose a writable folder") from None
    return Path(path)
