"""Writing a safetensors file the way every other file is written here: renamed into place
(a killed write never looks complete) and with the mode a new file gets (0666 less the
umask). safetensors' own `save_file` makes the file private (0600), so a service running as
another user could read a controller's meta.json beside it and not its weights."""

from __future__ import annotations

from pathlib import Path


def save_tensors(tensors: dict, path: Path) -> Path:
    """Write `tensors` (name -> contiguous tensor) to `path` as safetensors."""
    from safetensors.torch import save as serialise

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)  # made anew: a killed write's leftover would keep its mode
    tmp.write_bytes(serialise(tensors))
    tmp.replace(path)
    return path


__all__ = ["save_tensors"]
