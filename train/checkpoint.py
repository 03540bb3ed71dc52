"""Training checkpoints that survive crashes: written to a temporary file, then renamed into place.

A run folder holds ``checkpoint-last.pt`` and, once a second save happened, ``checkpoint-prev.pt``.
A save that fails part-way (killed process, full disk) leaves both untouched. The files hold tensors
and plain containers only, so they load with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


class CheckpointManager:
    """Atomic save / load of the training state in one run folder."""

    def __init__(self, folder):
        self.folder = Path(folder)

    @property
    def last_path(self) -> Path:
        return self.folder / "checkpoint-last.pt"

    @property
    def prev_path(self) -> Path:
        return self.folder / "checkpoint-prev.pt"

    def save(self, state: dict) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".checkpoint-{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())  # the bytes are on disk before the rename makes them "last"
            if self.last_path.exists():
                os.replace(self.last_path, self.prev_path)
            os.replace(tmp, self.last_path)
        finally:
            if tmp.exists():
                tmp.unlink()
        return self.last_path

    def load_last(self, *, map_location="cpu") -> dict | None:
        """The newest readable checkpoint (last, else prev), or None when the folder has none."""
        for path in (self.last_path, self.prev_path):
            if path.exists():
                try:
                    return torch.load(path, map_location=map_location, weights_only=True)
                except (RuntimeError, EOFError, OSError) as err:  # a damaged file: fall back to the older one
                    print(f"warning: cannot read {path} ({err}); trying the previous checkpoint")
        return None
