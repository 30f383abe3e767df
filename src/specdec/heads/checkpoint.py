"""The files of a head directory: config.json and model.safetensors, shared by every head kind."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from specdec.errors import InputError

WEIGHTS_FILE = "model.safetensors"


def read_config(path: Path) -> dict:
    """A head directory's config.json as a dict; InputError (one line) when missing or unreadable."""
    cfg_path = Path(path) / "config.json"
    try:
        data = json.loads(cfg_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{str(path)!r} is not a head directory (no config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"cannot read {cfg_path}: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"{cfg_path}: not a JSON object")
    return data


def write_checkpoint(module: nn.Module, config: dict, out_dir: Path, dtype: torch.dtype) -> None:
    """config.json + model.safetensors: float tensors in `dtype`, integer and bool ones as they are. The
    weights are written to a temporary file first, so an interrupted save never leaves a torn checkpoint."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.detach().to(dtype) if v.is_floating_point() else v.detach()).contiguous()
        for k, v in module.state_dict().items()
    }
    tmp = out_dir / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(out_dir / WEIGHTS_FILE)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
