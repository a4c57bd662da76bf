"""The restore point of one ``prune()`` call, kept on disk instead of in memory.

``prune()`` promises that any failure, Ctrl-C included, leaves the model exactly as it was.
Holding a copy of every target weight for that doubles the model in memory (the copy alone is
the model's size). Instead each layer's original weight is written to a temporary file (its raw
bytes, written straight from the tensor: no serialised copy in memory) just before the layer is
first changed, and read back only if the run fails; layers not
yet reached have nothing saved, so the memory held never depends on the number of layers. The
folder is made in the system's temporary directory (``TMPDIR``: keep it on a disk, not a tmpfs
held in memory, for large models) and is always removed, on success and on failure.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable

import torch


class RestorePoint:
    """Originals of the layers changed so far, one small file each, in a private temp folder.

    ``save(name, weight)`` is called before a layer changes (once per layer: later calls are
    ignored); ``restore(write)`` gives every saved original back through ``write(name, w)``;
    ``close()`` removes the folder. Use it as a context manager: on an exception the saved
    weights are restored, and the folder is removed in every case.
    """

    def __init__(self, write: Callable[[str, torch.Tensor], None], directory: str | None = None) -> None:
        self.write = write
        self.folder = tempfile.mkdtemp(prefix="prunekit-restore-", dir=directory)
        # layer name -> (file, dtype, shape); only complete files are listed
        self.files: dict[str, tuple[str, torch.dtype, torch.Size]] = {}

    def save(self, name: str, weight: torch.Tensor) -> None:
        """Write ``weight`` (the layer's current, original value) to disk, unless already saved."""
        if name in self.files:
            return
        path = os.path.join(self.folder, f"{len(self.files)}.bin")
        w = weight.detach().to("cpu").contiguous()
        with open(path, "wb") as f:
            f.write(w.reshape(-1).view(torch.uint8).numpy().data)
        self.files[name] = (path, w.dtype, w.shape)  # listed only once the file is whole

    @torch.no_grad()
    def restore(self) -> None:
        """Write every saved original back (the last changed first)."""
        for name, (path, dtype, shape) in reversed(list(self.files.items())):
            self.write(name, torch.from_file(path, size=shape.numel(), dtype=dtype).reshape(shape))

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.files.clear()

    def __enter__(self) -> "RestorePoint":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                self.restore()
        finally:
            self.close()
