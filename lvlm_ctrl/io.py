"""Atomic result writes: a crash mid-write never leaves a half file where a good one was."""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_json(path: str | Path, data) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, allow_nan=False) + "\n")


def machine() -> dict:
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu"
    return {"host": platform.node(), "platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpus": os.cpu_count(), "device": device}


def command(module: str) -> str:
    """The command line that produced a result, for the record."""
    return " ".join(["python -m", module] + sys.argv[1:])
