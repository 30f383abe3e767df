"""Medusa heads: independent heads on the target's last hidden state, stored in the layout vLLM's
`MedusaModel` loads."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.heads.medusa import MedusaConfig, MedusaHeads, load_medusa, save_medusa
from specdec.train.features import FeatureStore
from specdec.train.head_recipe import Batch, HeadTrainConfig, PerDepthHeads, vocab_phrase


class MedusaRecipe(PerDepthHeads):
    name = "medusa"
    title = "Medusa heads"
    drafting = "with the independent heads"
    reads = "nothing else"

    def depth(self, cfg: HeadTrainConfig) -> int:
        return cfg.medusa_heads

    def build(
        self, target, store: FeatureStore, cfg: HeadTrainConfig, draft_ids: torch.Tensor
    ) -> MedusaHeads:
        tc = target.config.get_text_config(decoder=True)
        heads = MedusaHeads(
            MedusaConfig(
                tc.hidden_size, tc.vocab_size, cfg.medusa_heads, cfg.medusa_layers, draft_ids.numel()
            )
        )
        heads.set_draft_vocab(draft_ids)
        return heads

    def draft_logits(self, head, b: Batch, depth: int) -> list[torch.Tensor]:
        # Head k on the target's final hidden state at t (the target's own lm_head gives token t + 1).
        return head(b["final"])[:depth]

    save = staticmethod(save_medusa)
    load = staticmethod(load_medusa)

    def drafting_step(self, head, width: int, prefix: int, repeats: int) -> Callable[[int], object]:
        # Every head on `width` hidden states: logits and a top-4 per head (no cache: `prefix` is unused).
        hidden = torch.randn(width, head.config.hidden_size, generator=torch.Generator().manual_seed(0))

        def step(_i: int) -> None:
            for logits in head(hidden):
                logits.topk(4, dim=-1)

        return step

    def card_intro(self, m: dict) -> str:
        tc = m["train_config"]
        return f"""{tc["medusa_heads"]} Medusa heads on the target's last hidden state (the input of its lm_head; head
k = {tc["medusa_layers"]} residual SiLU layer(s) + an LM head, drafting the token k + 2 ahead), with {vocab_phrase(m)}.
{m["parameters"] / 1e6:.2f}M parameters. `config.json` + `model.safetensors` (bfloat16; `token_map` int64) are in the
layout vLLM's `MedusaModel` loads; specdec loads them as float32. Built with `specdec train-drafter --method medusa`
(src/specdec/train/drafter.py)."""

    def card_cost(self, lat: dict) -> str:
        return (
            f"All heads on 1 hidden state (logits over the draft vocabulary, top-4 each): "
            f"{lat['head_step_1']:.2f} ms; on 8 hidden states: {lat['head_step_8']:.2f} ms"
        )
