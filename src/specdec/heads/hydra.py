"""Hydra heads (Ankner et al. 2024): Medusa's heads made sequentially dependent.

Head k drafts the token k + 2 places after the last verified position t. Unlike a Medusa head, it reads what
comes before that token on the draft path as well as the target's hidden state h_t:

    x_k = fc_k(concat(h_t, E(x_{t+1}), ..., E(x_{t+k+1})))      ((k + 2) H -> H)
    logits_k = lm_head_k(block_k(x_k))                             (residual SiLU layers, then H -> draft vocab)

where x_{t+1} is the root (the target's own next token) and E is the target's input embedding (shared, not
stored). So the drafts of one tree branch are conditioned on each other, which is what a Medusa head cannot
do (its depth-2 guess is the same whichever depth-1 token it follows). `fc_k` starts as [I 0 ... 0] and the
residual layers at zero, so a new head starts as the target's next-token guess from h_t, like a new Medusa
head, and learns from there.

specdec's own layout (no serving engine loads Hydra heads): config `architectures: ["HydraModel"]`,
`hidden_size`, `vocab_size`, `num_heads`, `num_hidden_layers`, `truncated_vocab_size` (as Medusa's); tensors
`fcs.{k}.weight|bias`, `blocks.{k}.layers.{j}.weight|bias` (Medusa's block), `lm_heads.{k}.weight` and
`token_map` (int64: draft id -> target id).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import InputError
from specdec.heads.checkpoint import check_sizes, load_weights, read_config, write_checkpoint
from specdec.heads.medusa import MedusaConfig, ResidualBlock, linears

ARCHITECTURE = "HydraModel"


@dataclass
class HydraConfig(MedusaConfig):
    """Medusa's fields (num_heads: head k drafts the token k + 2 ahead; Hydra++ uses 4), another architecture."""

    kind: ClassVar[str] = "Hydra"
    architecture: ClassVar[str] = ARCHITECTURE


class HydraHeads(nn.Module):
    token_map: torch.Tensor  # a buffer: draft id -> target id

    def __init__(self, config: HydraConfig):
        super().__init__()
        c = self.config = config
        h = c.hidden_size
        fcs = [nn.Linear((k + 2) * h, h) for k in range(c.num_heads)]
        with torch.no_grad():  # [I 0 ... 0]: a new head reads h_t alone (the target's next-token guess)
            for fc in fcs:
                fc.weight.zero_()
                fc.weight[:, :h] = torch.eye(h)
                fc.bias.zero_()
        self.fcs = nn.ModuleList(fcs)
        self.blocks = nn.ModuleList(ResidualBlock(h, c.num_hidden_layers) for _ in range(c.num_heads))
        self.lm_heads = nn.ModuleList(
            nn.Linear(h, c.draft_vocab_size, bias=False) for _ in range(c.num_heads)
        )
        self.register_buffer("token_map", torch.arange(c.draft_vocab_size))
        self.embedding: torch.Tensor | None = None  # the target's input embedding [V, H] (bind_embedding)

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        self.token_map.copy_(torch.as_tensor(target_ids, dtype=torch.long))

    @property
    def draft_to_target(self) -> torch.Tensor:  # [draft_vocab] target ids
        return self.token_map

    def bind_embedding(self, weight: torch.Tensor) -> None:
        """The target's input embedding [V, H] (read, never trained or stored)."""
        if weight.shape[-1] != self.config.hidden_size:
            raise InputError(
                f"Hydra heads read the target's token embeddings as wide as its hidden state "
                f"({self.config.hidden_size}); this target's are {weight.shape[-1]} wide"
            )
        self.embedding = weight.detach()

    def head(self, k: int, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """Head k: hidden [M, H] (h_t) and path [M, k + 1] target ids (x_{t+1} .. x_{t+k+1}) -> logits
        [M, draft_vocab] for x_{t+k+2}."""
        assert self.embedding is not None, "bind_embedding first"
        e = F.embedding(path, self.embedding).to(hidden.dtype).flatten(1)  # [M, (k + 1) H]
        x = self.fcs[k](torch.cat([hidden, e], dim=-1))
        return self.lm_heads[k](self.blocks[k](x))

    def forward_train(self, final: torch.Tensor, ids: torch.Tensor, depth: int) -> list[torch.Tensor]:
        """Teacher-forced, every row at once: final [B, T, H] (h_t per row t), ids [B, T] (the text) -> per
        head k < depth logits [B, T, draft_vocab] whose row t drafts token t + k + 2 from the text's tokens
        t + 1 .. t + k + 1 (rows near the end read zero embeddings: they have no label)."""
        assert self.embedding is not None, "bind_embedding first"
        e = F.embedding(ids, self.embedding).to(final.dtype)  # [B, T, H]
        shifted = [F.pad(e[:, j:], (0, 0, 0, j)) for j in range(1, depth + 1)]  # row t: E(x_{t+j})
        outs = []
        for k in range(depth):
            x = self.fcs[k](torch.cat([final, *shifted[: k + 1]], dim=-1))
            outs.append(self.lm_heads[k](self.blocks[k](x)))
        return outs


class PackedHydra:
    """The heads' weights packed for drafting (`Matrix`: the target forward's kernels, oneDNN on prepacked
    weights from two rows on, and for one row where timed faster; nn.Linear's MKL call repacks the weight every time, which cost more than the
    product itself for the 2-4 rows a depth drafts: docs/methods.md has the figures). `HydraHeads.head` computes the same function (the reference: training and tests use it);
    the weights are read once, when the drafter binds."""

    def __init__(self, heads: HydraHeads) -> None:
        from specdec.runtime.kernels import Matrix

        self.heads = heads  # its embedding (bound to the target's) is read at each call
        blocks = [b for b in heads.blocks.children() if isinstance(b, ResidualBlock)]
        with torch.no_grad():
            self.fcs = [(Matrix(fc.weight), fc.bias.detach()) for fc in linears(heads.fcs)]
            self.blocks = [[(Matrix(x.weight), x.bias.detach()) for x in linears(b.layers)] for b in blocks]
            self.lm_heads = [Matrix(lm.weight) for lm in linears(heads.lm_heads)]

    @torch.inference_mode()
    def head(self, k: int, hidden: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
        """`HydraHeads.head`, the same arguments and result."""
        assert self.heads.embedding is not None, "bind_embedding first"
        e = F.embedding(path, self.heads.embedding).to(hidden.dtype).flatten(1)  # [M, (k + 1) H]
        fc, bias = self.fcs[k]
        x = fc(torch.cat([hidden, e], dim=-1), bias)
        for layer, b in self.blocks[k]:  # ResidualBlock: x + silu(W x + b)
            x = x + F.silu(layer(x, b))
        return self.lm_heads[k](x)


def save_hydra(heads: HydraHeads, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    write_checkpoint(heads, heads.config.to_json(), out_dir, dtype)


def load_hydra(path: Path, target=None, dtype: torch.dtype = torch.float32) -> HydraHeads:
    """Load a Hydra head directory as `dtype`, bound to `target`'s embedding when given; InputError (one line)
    for bad files or another model's head."""
    path = Path(path)
    config = HydraConfig.from_json(read_config(path), str(path / "config.json"))
    heads = HydraHeads(config)
    load_weights(path, heads, "a Hydra head")
    heads.to(dtype)
    if target is not None:
        check_sizes(config.hidden_size, config.vocab_size, target, str(path))
        heads.bind_embedding(target.get_input_embeddings().weight.to(dtype))
    return heads.eval()
