"""Trained draft heads that read the target's own hidden states (EAGLE-3; see eagle3.py for the layout)."""

from specdec.heads.eagle3 import (
    Eagle3Config,
    Eagle3Head,
    HeadCache,
    check_target,
    config_for_target,
    default_aux_layer_ids,
    load_config,
    load_head,
    save_head,
)

__all__ = [
    "Eagle3Config",
    "Eagle3Head",
    "HeadCache",
    "check_target",
    "config_for_target",
    "default_aux_layer_ids",
    "load_config",
    "load_head",
    "save_head",
]
