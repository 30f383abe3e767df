"""Training `learn2pd`'s filter (`specdec train-dllm --filter`): decoding traces of the `one` policy on
training-stream prompts, every decodable position's features labelled with whether its candidate was what `one`
finally committed there, and the small network fitted to them. The policy
(`specdec.dllm.policies.learn2pd`) only decodes with the filter this saves: it imports no engine, and the
engine imports the policies."""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from specdec.dllm.policies.base import BlockView, Selection
from specdec.dllm.policies.learn2pd import FEATURES, FILTER_FILE, features, new_filter
from specdec.dllm.policies.one import One
from specdec.errors import InputError


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
