"""`learn2pd` (Learn2PD): a small learned filter predicts, from a position's confidence features, whether its
current candidate is already the token it will end up with; positions it trusts to `threshold` are committed.

The filter is trained by `specdec train-dllm --filter` on decoding traces of the `one` policy (one token per
forward, the quality reference): at every forward each decodable position's features are recorded, labelled
with whether the candidate equals what `one` finally committed there. It is 7 features -> 32 -> 1 (about 300
weights), so running it costs nothing next to the forward.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from specdec.dllm.policies.base import BlockView, Policy, Selection, at_least_one, unit_interval
from specdec.dllm.policies.one import One
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
        "threshold": "commit where the filter's probability that the candidate is final is >= this, in (0, 1] "
        "(default 0.9)",
        "filter": "the filter's file or model directory (default: the shipped dllm's)",
    }
    threshold = 0.9
    filter = ""

    def check(self) -> None:
        unit_interval("threshold", self.threshold)
        self.net = load_filter(self.filter or shipped_filter())

    def select(self, view: BlockView) -> Selection:
        score = torch.sigmoid(self.net(features(view))[:, 0])
        return Selection(at_least_one(view, score >= self.threshold, score))


class Tracer(One):
    """`one` that records every decodable position's features and candidate, labelled at the block's end."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.rows: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self._block: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def fresh(self) -> Tracer:
        return self  # one tracer collects across generations

    def start_block(self, length: int) -> None:
        self._block = []

    def select(self, view: BlockView) -> Selection:
        where = view.eligible.nonzero()[:, 0]
        self._block.append((features(view)[where], view.tokens[where], where))
        return super().select(view)

    def end_block(self, tokens: list[int]) -> None:
        final = torch.tensor(tokens, dtype=torch.long)
        for feats, cand, where in self._block:
            keep = where < len(tokens)  # positions after an end-of-text were never decided
            self.rows.append(feats[keep])
            self.labels.append((cand[keep] == final[where[keep]]).float())


def train_filter(model_dir: Path, workdir: Path, threads: int = 2, prompts: int = 160, seed: int = 0) -> dict:
    """Collect `one`-policy traces on training-stream prompts, fit the filter, save it beside the model."""
    import numpy as np
    from tqdm import tqdm

    from specdec.dllm.engine import DllmEngine
    from specdec.models.loading import load_causal_lm
    from specdec.sampling import SamplingParams

    data_file = workdir / "train.bin"
    if not data_file.is_file():
        raise InputError(
            f"{data_file} is missing: run `specdec train-dllm --stage prepare --workdir {workdir}`"
        )
    torch.set_num_threads(threads)
    model, tokenizer = load_causal_lm(str(model_dir))
    tracer = Tracer()
    engine = DllmEngine(model, tokenizer, tracer, name=str(model_dir))
    data = np.memmap(data_file, dtype=np.uint16, mode="r")
    rng = np.random.default_rng(seed)
    for start in tqdm(rng.integers(0, data.size - 200, size=prompts), desc="learn2pd traces", unit="prompt"):
        ids = data[start : start + 128].astype(np.int64).tolist()
        for _ in engine.run(ids, SamplingParams(max_new_tokens=64, ignore_eos=True)):
            pass
    x, y = torch.cat(tracer.rows), torch.cat(tracer.labels)
    order = list(range(len(y)))
    random.Random(seed).shuffle(order)
    split = int(0.8 * len(order))
    train_idx, test_idx = torch.tensor(order[:split]), torch.tensor(order[split:])
    torch.manual_seed(seed)
    net = new_filter()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    for _ in tqdm(range(400), desc="learn2pd filter", unit="epoch"):
        loss = F.binary_cross_entropy_with_logits(net(x[train_idx])[:, 0], y[train_idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        prob = torch.sigmoid(net(x[test_idx])[:, 0])
        truth = y[test_idx].bool()
        confident = prob >= 0.9
        metrics = {
            "examples": len(y),
            "final_fraction": float(y.mean()),
            "heldout_accuracy": float(((prob >= 0.5) == truth).float().mean()),
            "heldout_precision_at_0.9": float(truth[confident].float().mean()) if confident.any() else None,
            "heldout_recall_at_0.9": float((confident & truth).sum() / truth.sum().clamp_min(1)),
            "prompts": prompts,
            "features": list(FEATURES),
        }
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(model_dir / FILTER_FILE))
    (model_dir / "learn2pd_filter.json").write_text(json.dumps(metrics, indent=1))
    print(json.dumps(metrics))
    return metrics
