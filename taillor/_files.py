"""Atomic file writes: a temp file in the target folder, fsync, then rename, so a crash never leaves half a file."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import tempfile
from typing import Callable

import torch


def _new_file_mode() -> int:
    """The mode open() gives a new file: 0o666 less the process umask (read from /proc where it can be, so the
    umask is never changed, even for a moment)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then atomically move the result to ``path``, with the mode a plain write would
    leave: the replaced file's, or a new file's (mkstemp's own 0o600 would hide a saved adapter from a server
    running as another user)."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, stat.S_IMODE(os.stat(path).st_mode) if os.path.exists(path) else _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> str:
    """Write ``tensors`` as a safetensors file, atomically; returns the SHA-256 of the bytes written."""
    from safetensors.torch import save
    data = save(tensors, metadata=metadata)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            handle.write(data)
    atomic_write(path, write)
    return hashlib.sha256(data).hexdigest()


def atomic_save_json(data: dict, path: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=2, sort_keys=True)
            handle.write("\n")
    atomic_write(path, write)
