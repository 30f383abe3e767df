"""Hydra heads: head k reads the target's last hidden state and the tokens of the path before the one it
drafts; stored in specdec's own layout (no serving engine loads Hydra heads)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from specdec.heads.hydra import HydraConfig, HydraHeads, load_hydra, save_hydra
from specdec.train.features import FeatureStore
from specdec.train.head_recipe import Batch, HeadTrainConfig, PerDepthHeads, vocab_phrase


class HydraRecipe(PerDepthHeads):
    name = "hydra"
    title = "Hydra heads"
    drafting = "with the heads in turn, each reading the tokens before it"
    reads = "the text's tokens before it (teacher forcing)"

    def depth(self, cfg: HeadTrainConfig) -> int:
        return cfg.hydra_heads

    def build(self, target, store: FeatureStore, cfg: HeadTrainConfig, draft_ids: torch.Tensor) -> HydraHeads:
        tc = target.config.get_text_config(decoder=True)
        hydra = HydraHeads(
            HydraConfig(tc.hidden_size, tc.vocab_size, cfg.hydra_heads, cfg.hydra_layers, draft_ids.numel())
        )
        hydra.set_draft_vocab(draft_ids)
        hydra.bind_embedding(target.get_input_embeddings().weight.float())
        return hydra

    def draft_logits(self, head, b: Batch, depth: int) -> list[torch.Tensor]:
        # Head k on the target's final hidden state at t and the text's tokens t + 1 .. t + k + 1.
        return head.forward_train(b["final"], b["ids"], depth)

    save = staticmethod(save_hydra)
    load = staticmethod(load_hydra)

    def drafting_step(self, head, width: int, prefix: int, repeats: int) -> Callable[[int], object]:
        # Every head in turn on `width` paths, as a tree is drafted depth by depth (`prefix` is unused).
        gen = torch.Generator().manual_seed(0)
        hidden = torch.randn(width, head.config.hidden_size, generator=gen)
        paths = torch.randint(0, head.config.vocab_size, (width, head.config.num_heads), generator=gen)

        def step(_i: int) -> None:
            for k in range(head.config.num_heads):
                head.head(k, hidden, paths[:, : k + 1]).topk(4, dim=-1)

        return step

    def card_intro(self, m: dict) -> str:
        tc = m["train_config"]
        return f"""{tc["hydra_heads"]} Hydra heads: head k reads the target's last hidden state (the input of its lm_head) and the
token embeddings of the k + 1 tokens before the one it drafts (the root and the drafts on its path), through
a linear layer ((k + 2) x hidden -> hidden), {tc["hydra_layers"]} residual SiLU layer(s) and an LM head, drafting the token k + 2
ahead; {vocab_phrase(m)}. {m["parameters"] / 1e6:.2f}M parameters (the token embedding is the target's and is not stored).
`config.json` + `model.safetensors` (bfloat16; `token_map` int64) in specdec's own layout (no serving engine
loads Hydra heads); specdec loads them as float32. Built with `specdec train-drafter --method hydra`
(src/specdec/train/drafter.py)."""

    def card_cost(self, lat: dict) -> str:
        return (
            f"Every head in turn on 1 path (logits over the draft vocabulary, top-4 each): "
            f"{lat['head_step_1']:.2f} ms; on 8 paths: {lat['head_step_8']:.2f} ms"
        )
