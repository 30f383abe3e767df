"""`learn2pd` (Learn2PD): a small learned filter predicts, from a position's confidence features, whether its
current candidate is already the token it will end up with; positions it trusts to `threshold` are committed.

The filter is trained by `specdec train-dllm --filter` (`specdec.dllm.learn2pd_train`) on decoding traces of
the `one` policy (one token per forward, the quality reference): at every forward each decodable position's
features are recorded, labelled with whether the candidate equals what `one` finally committed there. It is
7 features -> 32 -> 1 (about 300 weights), so running it costs nothing next to the forward.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from specdec.dllm.policies.base import BlockView, Param, Policy, Selection, at_least_one, fraction
from specdec.errors import InputError

FEATURES = (
    "confidence",  # the candidate's probability
    "margin",  # top-1 minus top-2 probability
    "entropy",  # of the position's distribution, / log V
    "position",  # in the block, / block length
    "gap",  # distance to the nearest decided token on its left, / block length
    "masked_fraction",  # of the block still masked
    "forward",  # forwards over this block so far, / block length
)
HIDDEN = 32
FILTER_FILE = "learn2pd_filter.safetensors"


def features(view: BlockView) -> torch.Tensor:
    """[n, len(FEATURES)] float32, one row per block position."""
    probs = torch.softmax(view.logits.float(), dim=-1)
    n, vocab = probs.shape
    top2 = probs.topk(2, dim=-1).values
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(vocab)
    idx = torch.arange(n)
    decided = torch.where(~view.masked, idx, torch.full_like(idx, -1))
    last_left = torch.cummax(torch.cat([torch.tensor([-1]), decided[:-1]]), dim=0).values  # decided before j
    gap = (idx - last_left).float()
    return torch.stack(
        [
            view.confidence.float(),
            top2[:, 0] - top2[:, 1],
            entropy,
            idx.float() / n,
            gap / n,
            view.masked.float().mean().expand(n),
            torch.tensor(float(view.forward) / n).expand(n),
        ],
        dim=1,
    )


def new_filter() -> nn.Sequential:
    return nn.Sequential(nn.Linear(len(FEATURES), HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 1))


_LOADED: dict[str, nn.Sequential] = {}


def load_filter(path: str) -> nn.Sequential:
    if path not in _LOADED:
        file = Path(path)
        if file.is_dir():
            file = file / FILTER_FILE
        if not file.is_file():
            raise InputError(f"no learn2pd filter at {path!r} (train one with `specdec train-dllm --filter`)")
        net = new_filter()
        net.load_state_dict({k: v.float() for k, v in load_file(file).items()})
        net.eval()
        _LOADED[path] = net
    return _LOADED[path]


def shipped_filter() -> str:
    from specdec.models.shipped import SHIPPED_DIR

    return str(SHIPPED_DIR / "dllm" / FILTER_FILE)


class Learn2PD(Policy):
    name = "learn2pd"
    params = {
        "threshold": Param(
            "commit where the filter's probability that the candidate is final is >= this, in (0, 1] "
            "(default 0.9)",
            fraction,
        ),
        # no rule: `check` loads it, which is its check
        "filter": Param("the filter's file or model directory (default: the shipped dllm's)"),
    }
    threshold = 0.9
    filter = ""

    def check(self) -> None:
        super().check()
        self.net = load_filter(self.filter or shipped_filter())

    def select(self, view: BlockView) -> Selection:
        score = torch.sigmoid(self.net(features(view))[:, 0])
        return Selection(at_least_one(view, score >= self.threshold, score))
