"""The transformers runtime over a view of a model with some decoder layers skipped (layerskip's draft, and
draft models run as such a view): shallow copies of the causal-LM and decoder modules that share every
parameter, with the decoder's layer list replaced by the kept layers and a copied config to match. The user's
model and config objects are never modified. HF attention modules write their keys and values with their
ORIGINAL layer index, so the view's cache maps original indices to its slots (`KeptLayersCache`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from specdec.errors import UnsupportedModelError
from specdec.runtime.hf import ModelRunner
from specdec.runtime.kvcache import KVCache


def decoder_layers(model) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not hasattr(model, "lm_head"):
        raise UnsupportedModelError(
            f"layerskip needs a decoder-only LM with `model.layers` and `lm_head`; {type(model).__name__} has not"
        )
    return layers


def skipping_view(model, keep: list[int]):
    """A shallow copy of `model` that runs only decoder layers `keep`; every parameter is shared."""
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(keep)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in keep]
    decoder = copy.copy(model.model)
    decoder.__dict__["_modules"] = dict(model.model._modules)  # copy.copy shares the dict: never write to it
    decoder._modules["layers"] = nn.ModuleList([model.model.layers[i] for i in keep])
    decoder.__dict__["config"] = config
    view = copy.copy(model)
    view.__dict__["_modules"] = dict(model._modules)
    view._modules["model"] = decoder
    view.__dict__["config"] = config
    return view


class KeptLayersCache(KVCache):
    """One slot per kept layer; attention modules address it with their original layer index."""

    def __init__(self, keep: list[int], capacity: int) -> None:
        super().__init__(len(keep), capacity)
        self.slot = {layer: i for i, layer in enumerate(keep)}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return super().update(key_states, value_states, self.slot[layer_idx], *args, **kwargs)


class ViewRunner(ModelRunner):
    def __init__(self, model, keep: list[int]) -> None:
        super().__init__(skipping_view(model, keep))
        self.keep = keep

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        """Prefill into a fresh cache (the target's own checks already ran on the full model)."""
        self.cache = KeptLayersCache(self.keep, positions + slack)
        self.forwards = 0
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        return self._forward(ids, None, None, logits_to_keep=1).logits[-1]
