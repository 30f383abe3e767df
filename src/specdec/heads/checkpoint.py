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


def load_weights(path: Path, module: nn.Module, what: str, state_fix=None) -> None:
    """Load `path`/model.safetensors into `module` (its own dtypes), checking names and shapes against it;
    InputError (one line) naming `what` the module should be. `state_fix(state)` may fill in tensors a
    checkpoint may leave out before the check."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = Path(path) / WEIGHTS_FILE
    try:
        state = load_file(str(weights))
    except FileNotFoundError:
        raise InputError(f"{str(path)!r} has no {WEIGHTS_FILE}") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).splitlines()[0]
        raise InputError(f"{weights} is corrupt or not a safetensors file ({msg})") from None
    if state_fix is not None:
        state = state_fix(state)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise InputError(f"{weights} lacks {missing[0]}: not {what} in the expected layout")
    for name, ref in expected.items():
        if tuple(state[name].shape) != tuple(ref.shape):
            raise InputError(
                f"{weights}: {name} has shape {tuple(state[name].shape)}, config.json implies {tuple(ref.shape)}"
            )
    module.load_state_dict({k: state[k].to(ref.dtype) for k, ref in expected.items()})


def check_sizes(hidden_size: int, vocab_size: int, target, where: str) -> None:
    """A head that reads the target's final hidden state and drafts its tokens is refused for a target of
    another hidden size or vocabulary (InputError, one line)."""
    tc = target.config.get_text_config(decoder=True)
    if hidden_size != tc.hidden_size:
        raise InputError(
            f"{where} was trained for a target with hidden size {hidden_size}; this target has {tc.hidden_size}"
        )
    if vocab_size != tc.vocab_size:
        raise InputError(
            f"{where} was trained for a vocabulary of {vocab_size} tokens; this target has {tc.vocab_size}"
        )
