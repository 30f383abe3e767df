"""Medusa heads: K independent heads on the target's last hidden state, head i drafting the token i + 2 ahead.

Head i = ResidualBlock (x + SiLU(W x + b), per layer; W zero-initialised so a new head starts as the target's
own lm_head) -> Linear(H, draft vocabulary). The target's lm_head already gives the next token (t + 1) from the
hidden state h_t at the last verified position; head i drafts token t + i + 2 from the same h_t.

The on-disk format is the layout vLLM's `vllm/model_executor/models/medusa.py` loads (read with the search
tool; not copied): config `architectures: ["MedusaModel"]`, `hidden_size`, `vocab_size`, `num_heads`,
`num_hidden_layers` (residual layers per head), `truncated_vocab_size`, `medusa_fc_bias`; tensors
`blocks.{i}.layers.{j}.weight|bias`, `lm_heads.{i}.weight` ([truncated_vocab, H]) and `token_map` (int64
[truncated_vocab]: draft id -> target id), which vLLM requires whenever truncated_vocab_size < vocab_size.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, TypeVar

import torch
import torch.nn.functional as F
from torch import nn

from specdec.errors import InputError
from specdec.heads.checkpoint import check_sizes, load_weights, read_config, write_checkpoint

ARCHITECTURE = "MedusaModel"
C = TypeVar("C", bound="MedusaConfig")


@dataclass
class MedusaConfig:
    kind: ClassVar[str] = "Medusa"  # names the head in errors
    architecture: ClassVar[str] = ARCHITECTURE
    hidden_size: int  # the target's final hidden width (the heads read its lm_head input)
    vocab_size: int  # the target's vocabulary
    num_heads: int = 4  # head i drafts the token i + 2 ahead; Medusa's default is up to 5
    num_hidden_layers: int = 1  # residual SiLU layers per head (Medusa-1's default)
    truncated_vocab_size: int | None = None  # draft vocabulary (most frequent target tokens); None = full

    @property
    def draft_vocab_size(self) -> int:
        return self.truncated_vocab_size or self.vocab_size

    def to_json(self) -> dict:
        return {
            "architectures": [self.architecture],
            "model_type": self.kind.lower(),
            "hidden_size": self.hidden_size,
            "vocab_size": self.vocab_size,
            "num_heads": self.num_heads,
            "num_hidden_layers": self.num_hidden_layers,
            "truncated_vocab_size": self.draft_vocab_size,
            "medusa_fc_bias": True,  # Medusa's own blocks have a bias; vLLM's default is none
            "torch_dtype": "bfloat16",
        }

    @classmethod
    def from_json(cls: type[C], d: dict, where: str = "config.json") -> C:
        if cls.architecture not in (d.get("architectures") or []):
            raise InputError(f"{where}: not a {cls.kind} head (architectures {d.get('architectures')})")
        try:
            config = cls(
                hidden_size=int(d["hidden_size"]),
                vocab_size=int(d["vocab_size"]),
                num_heads=int(d["num_heads"]),
                num_hidden_layers=int(d.get("num_hidden_layers", 1)),
                truncated_vocab_size=int(d.get("truncated_vocab_size") or d["vocab_size"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"{where}: missing or bad field {e}") from None
        if config.num_heads < 1:
            raise InputError(f"{where}: num_heads must be >= 1")
        return config


class ResidualBlock(nn.Module):
    def __init__(self, hidden: int, layers: int):
        super().__init__()
        linears = [nn.Linear(hidden, hidden) for _ in range(layers)]
        for layer in linears:  # a new head starts as the identity: the target's lm_head on h_t
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(linears)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + F.silu(layer(x))
        return x


class MedusaHeads(nn.Module):
    """State dict names == vLLM's Medusa checkpoint names."""

    token_map: torch.Tensor  # a buffer (registered in __init__), declared so that it types as a tensor

    def __init__(self, config: MedusaConfig):
        super().__init__()
        c = self.config = config
        self.blocks = nn.ModuleList(
            ResidualBlock(c.hidden_size, c.num_hidden_layers) for _ in range(c.num_heads)
        )
        self.lm_heads = nn.ModuleList(
            nn.Linear(c.hidden_size, c.draft_vocab_size, bias=False) for _ in range(c.num_heads)
        )
        self.register_buffer("token_map", torch.arange(c.draft_vocab_size))  # draft id -> target id

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        self.token_map.copy_(torch.as_tensor(target_ids, dtype=torch.long))

    @property
    def draft_to_target(self) -> torch.Tensor:  # [draft_vocab] target ids
        return self.token_map

    def forward(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [..., H] (the target's lm_head input) -> per head logits [..., draft_vocab]."""
        return [head(block(hidden)) for block, head in zip(self.blocks, self.lm_heads, strict=True)]


def linears(modules: nn.Module) -> list[nn.Linear]:
    """The nn.Linear children of a ModuleList (typed, for packing)."""
    return [m for m in modules.children() if isinstance(m, nn.Linear)]


class PackedMedusa:
    """The heads' weights for drafting through `Matrix` (the target forward's kernels: MKL on the transposed
    weight for one row, where nn.Linear's call repacks the weight first: docs/methods.md has the figures).
    Called as `MedusaHeads` is (the reference: training and tests use it); the weights are read once, when
    the drafter binds."""

    def __init__(self, heads: MedusaHeads) -> None:
        from specdec.runtime.kernels import Matrix

        blocks = [b for b in heads.blocks.children() if isinstance(b, ResidualBlock)]
        with torch.no_grad():
            self.blocks = [[(Matrix(x.weight), x.bias.detach()) for x in linears(b.layers)] for b in blocks]
            self.lm_heads = [Matrix(m.weight) for m in linears(heads.lm_heads)]

    @torch.inference_mode()
    def __call__(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden [H] or [M, H] -> per head logits [M, draft_vocab] ([1, draft_vocab] for [H])."""
        x0 = hidden.reshape(-1, hidden.shape[-1])
        out = []
        for layers, lm_head in zip(self.blocks, self.lm_heads, strict=True):
            x = x0
            for layer, bias in layers:  # ResidualBlock: x + silu(W x + b)
                x = x + F.silu(layer(x, bias))
            out.append(lm_head(x))
        return out


def save_medusa(heads: MedusaHeads, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> None:
    write_checkpoint(heads, heads.config.to_json(), out_dir, dtype)


def load_medusa(path: Path, target=None, dtype: torch.dtype = torch.float32) -> MedusaHeads:
    """Load a Medusa head directory as `dtype`; InputError (one line) for bad files or another model's head."""
    path = Path(path)
    config = MedusaConfig.from_json(read_config(path), str(path / "config.json"))

    def fix(state: dict) -> dict:
        state = {k.removeprefix("medusa_heads."): v for k, v in state.items()}
        if "token_map" not in state and config.draft_vocab_size == config.vocab_size:
            state["token_map"] = torch.arange(config.vocab_size)
        return state

    heads = MedusaHeads(config)
    load_weights(path, heads, "a Medusa head", fix)
    heads.to(dtype)
    if target is not None:
        check_sizes(config.hidden_size, config.vocab_size, target, str(path))
    return heads.eval()
