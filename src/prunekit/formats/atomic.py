"""Write a file or a folder all or nothing: into a hidden sibling, renamed into place only when complete.

A pruning job writes its outputs after minutes or hours of work; an error or Ctrl-C while
writing must not leave a half-written model that looks finished. :func:`write_file` and
:func:`write_folder` write into a temporary sibling (same file system, so the final
``os.replace`` is atomic) and move it into place at the end; on any failure the temporary file or
folder is removed and what was there before stays (a replaced folder is put back).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Iterable


def write_file(path: str | os.PathLike, data: bytes | Iterable[bytes | memoryview]) -> None:
    """Write ``data`` (bytes, or chunks of it) to ``path``: complete and synced to disk, or not at
    all (an old file at ``path`` is then left as it was)."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would otherwise become the file's mode
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _umask() -> int:
    """The process's umask (reading it means setting it, so it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def check_output(out: str, overwrite: bool, what: str = "output.dir") -> None:
    """Raise if ``out`` is a file, or an existing folder that ``overwrite`` does not allow replacing."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"{what} {out!r} is a file, not a folder; choose another {what}")
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{what} {out!r} already exists; pass --overwrite / overwrite=True to replace "
                              f"it, or choose another {what}")


def write_folder(out: str, write: Callable[[str], None], *, overwrite: bool = False,
                 what: str = "output.dir") -> list[str]:
    """Call ``write(tmp)`` on a hidden sibling folder of ``out``, then move it to ``out``
    (replacing an old one only with ``overwrite``); return the names of the files written.
    On any error, including Ctrl-C, remove what was written and keep an old ``out`` as it was."""
    out = os.path.abspath(out)
    check_output(out, overwrite, what)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    old = None
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would otherwise become the output's mode
        write(tmp)
        files = sorted(os.listdir(tmp))
        check_output(out, overwrite, what)  # it may have appeared while we worked
        if os.path.exists(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not os.path.exists(out):
            os.replace(old, out)  # put the previous output back
            old = None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return files
