"""Atomic, private file writes and one-line disk errors: the only place mmtk creates temporary files.

Every writer (HDF5, checkpoints, recipes, metrics, JSON, pictures, arrays, ONNX, point clouds) writes to
a new temporary file in the target's folder and renames it over the target only when complete:

* the temporary name ``.NAME.tmp-<pid>-<random>[.suffix]`` is unpredictable and created with
  ``O_EXCL`` (:func:`tempfile.mkstemp`), so a symlink planted in the folder is never followed; a NAME too
  long for that within the file system's name limit is cut and ends in a hash of the whole (``~1a2b3c4d``);
* the data is fsynced before the rename (and the folder after it), the file gets the mode the
  user's umask gives a new file, and the temporary file is removed on any failure;
* the owner's PID in the name lets the next write into that folder recognise litter of a run that
  was killed (SIGKILL, power loss) and remove it, saying so in one line;
* a full disk, an exceeded quota, a read-only file system or a missing permission becomes one
  :class:`~mmtk.errors.MmtkError` line naming the path and what is missing (:func:`disk_error`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from mmtk.errors import MmtkError
from mmtk.progress import counted

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
NO_PERMISSION = frozenset({errno.EACCES, errno.EPERM})
DISK_ERRNOS = NO_SPACE | NO_PERMISSION | {errno.EROFS}
# .NAME.tmp-PID-RANDOM[.suffix]: what temp_prefix + mkstemp produce (mkstemp's random part is [a-z0-9_]).
_RANDOM_CHARS = 8  # what tempfile.mkstemp adds between the prefix and the suffix
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-(?P<pid>\d+)-[a-z0-9_]{6,}(?:\.[A-Za-z0-9]+)?$")
# HDF5 reports the failed write's errno inside its message ("errno = 28, error message = ...").
_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def temp_prefix(path: Path, suffix: str = "") -> str:
    """The name prefix of this process's temporary files for target ``path`` (and ``suffix``).

    A long target name (file systems allow 255 bytes) is cut and marked with a hash of the whole name, so the
    temporary name fits the folder's limit too and stays distinct per target.
    """
    pid = os.getpid()
    name = path.name
    overhead = len(f"..tmp-{pid}-".encode()) + _RANDOM_CHARS + len(suffix.encode())
    room = _name_max(path.parent) - overhead
    if len(name.encode()) > room:
        digest = hashlib.sha256(name.encode()).hexdigest()[:8]
        name = name.encode()[:max(room - 9, 1)].decode(errors="ignore") + "~" + digest
    return f".{name}.tmp-{pid}-"


def _name_max(folder: Path) -> int:
    """The longest file name (bytes) ``folder``'s file system allows."""
    try:
        return os.pathconf(_existing_parent(folder), "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is one of mmtk's temporary files (of any process)."""
    return _TEMP_NAME.match(name) is not None


def make_temp(path: str | os.PathLike, suffix: str = "", sweep: bool = True) -> Path:
    """Create an empty private (0600) temporary file beside ``path`` and return its path.

    The folder is created if needed; with ``sweep`` the litter of dead runs in it is removed first
    (:func:`remove_dead_temps`). Disk and permission errors become one :class:`MmtkError` line.
    """
    path = Path(path)
    with disk_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if sweep:
            remove_dead_temps(path.parent)
        handle, name = tempfile.mkstemp(prefix=temp_prefix(path, suffix), suffix=suffix, dir=path.parent)
        os.close(handle)
    return Path(name)


def publish(tmp: Path, path: str | os.PathLike) -> Path:
    """Make the finished temporary file ``tmp`` durable and rename it to ``path`` (removing it on failure)."""
    path = Path(path)
    try:
        with disk_errors(path):
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.chmod(tmp, 0o666 & ~_umask())
            os.replace(tmp, path)
    finally:
        discard(tmp)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return path


def discard(tmp: Path | None) -> None:
    """Remove a temporary file if it is still there."""
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "", sweep: bool = True) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s content to (for writers that take a file name).

    When the block ends normally the file is published under ``path``; on any exception it is
    removed and disk errors are re-raised as one :class:`MmtkError` line. ``suffix`` keeps the
    extension for writers that pick the format from the name (ONNX, open3d).

    Example::

        with atomic_path(out, suffix=".ply") as tmp:
            o3d.io.write_point_cloud(str(tmp), cloud)
    """
    path = Path(path)
    tmp = make_temp(path, suffix, sweep)
    try:
        with disk_errors(path):
            yield tmp
    except BaseException:
        discard(tmp)
        raise
    publish(tmp, path)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], object], sweep: bool = True) -> Path:
    """Write ``path`` atomically through ``write(handle)`` on a binary handle; returns ``path``.

    Example::

        atomic_write(run / "step_00000100.pt", lambda handle: torch.save(state, handle))
    """
    path = Path(path)
    with atomic_path(path, sweep=sweep) as tmp:
        with open(os.open(tmp, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW), "wb") as handle:
            write(handle)
    return path


def atomic_write_text(path: str | os.PathLike, text: str, sweep: bool = True) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")), sweep)


def remove_dead_temps(folder: str | os.PathLike, log: Callable[[str], None] | None = None) -> list[Path]:
    """Remove mmtk temporary files in ``folder`` whose owner process is gone; report them in one line.

    A temporary file whose PID is still alive (another run writing there now) is left alone.
    Returns the files removed.
    """
    folder = Path(folder)
    removed, size = [], 0
    with contextlib.suppress(OSError):
        with os.scandir(folder) as entries:
            for entry in entries:
                match = _TEMP_NAME.match(entry.name)
                if match is None or not entry.is_file(follow_symlinks=False) or _alive(int(match["pid"])):
                    continue
                with contextlib.suppress(OSError):
                    size += entry.stat(follow_symlinks=False).st_size
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
    if removed:
        names = ", ".join(p.name for p in removed[:3]) + (f" and {len(removed) - 3} more" if len(removed) > 3 else "")
        (log or _stderr)(f"note: removed {counted(len(removed), 'temporary file')} in {folder} left by runs that died "
                         f"({names}; {format_bytes(size)})")
    return removed


@contextlib.contextmanager
def disk_errors(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk, a read-only file system or a missing permission while writing ``path`` into one line."""
    try:
        yield
    except MmtkError:
        raise
    except Exception as err:
        translated = disk_error(err, path)
        if translated is None:
            raise
        raise translated from err


def disk_error(err: BaseException, path: str | os.PathLike | None) -> MmtkError | None:
    """One :class:`MmtkError` line for ``err`` if it is a disk or permission error while writing ``path``, else None.

    Recognises ``OSError`` errnos (ENOSPC, EDQUOT, EROFS, EACCES, EPERM) anywhere in the exception's
    chain, HDF5's ``errno = N`` messages and torch's ``inline_container.cc`` write failures.
    """
    code = error_code(err)
    path = Path(path) if path is not None else None
    if code is None and path is not None and "inline_container" in str(err) and _free_bytes(path) < 64 * 2**20:
        code = errno.ENOSPC  # torch.save reports a short write without its errno
    if code is None:
        return None
    if path is None:  # e.g. a write through an open handle: the errno is all there is
        return MmtkError(f"{os.strerror(code)} (errno {code}); free some space, or write to a folder you may write to")
    folder = _existing_parent(path)
    if code in NO_SPACE:
        what = "the disk quota is exhausted" if code == errno.EDQUOT else "no space left on the device"
        return MmtkError(f"{path}: {what} ({format_bytes(_free_bytes(path))} free on the file system of {folder}); "
                         f"free some space or write to another disk")
    if code == errno.EROFS:
        return MmtkError(f"{path}: the file system of {folder} is read-only; write to another folder")
    if path.is_file() and not os.access(path, os.R_OK):  # a file this user may not read (the CLI's last resort)
        return MmtkError(f"{path}: permission denied: this user (uid {os.geteuid()}) may not read it"
                         f"{_owner_text(path)}; change it with chmod/chown")
    return MmtkError(f"{path}: permission denied: this user (uid {os.geteuid()}) may not write to "
                     f"{folder}{_owner_text(folder)}; change it with chmod/chown or use another folder")


def error_code(err: BaseException) -> int | None:
    """The disk-related errno behind ``err`` (walking its cause/context chain), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        code = getattr(current, "errno", None) if isinstance(current, OSError) else None
        if code is None:
            found = _ERRNO_IN_TEXT.search(str(current))
            code = int(found.group(1)) if found else None
        if code in DISK_ERRNOS:
            return code
        current = current.__cause__ or current.__context__
    return None


def check_writable(path: str | os.PathLike) -> None:
    """Refuse in one line, before any work, when ``path`` could not be created (read-only or no permission)."""
    path = Path(path)
    folder = _existing_parent(path)
    if os.access(folder, os.W_OK | os.X_OK):
        return
    read_only = False
    with contextlib.suppress(OSError):
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    code = errno.EROFS if read_only else errno.EACCES
    raise disk_error(OSError(code, os.strerror(code), str(folder)), path)  # type: ignore[misc]


def check_free_space(path: str | os.PathLike, needed: int, what: str) -> None:
    """Refuse in one line when the file system of ``path`` has less than ``needed`` bytes free."""
    free = _free_bytes(Path(path))
    if free < needed:
        raise MmtkError(f"{path}: {what} needs about {format_bytes(needed)} but only {format_bytes(free)} are free "
                        f"on the file system of {_existing_parent(Path(path))}; free some space or write to "
                        f"another disk")


def available_ram() -> int:
    """Bytes of system memory available to this process: MemAvailable, within the container's cgroup v2 limit
    (a container's limit hides behind MemAvailable)."""
    available = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    if available is None:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    return int(available)


def format_bytes(count: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OSError, OverflowError):
        return False
    return True


def _umask() -> int:
    with contextlib.suppress(OSError, ValueError):  # Linux: read it without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _existing_parent(path: Path) -> Path:
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(_existing_parent(path)).free
    except OSError:
        return 0


def _owner_text(path: Path) -> str:
    try:
        info = path.stat()
    except OSError:
        return ""
    return f" (mode {info.st_mode & 0o7777:o}, owner uid {info.st_uid})"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr)
