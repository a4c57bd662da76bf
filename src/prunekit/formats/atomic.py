"""Write a folder all or nothing: into a hidden sibling, renamed into place only when complete.

A pruning job writes its outputs after minutes or hours of work; an error or Ctrl-C while
writing must not leave a half-written model that looks finished. :func:`write_folder` writes
into a temporary sibling (same file system, so the final ``os.replace`` is atomic) and moves it
into place at the end; on any failure the temporary folder is removed and a replaced folder
is put back.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable


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
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the output's mode
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
