"""Held-out acceptance of the shipped EAGLE-3 head reading its trained layers, and reading them one layer off.

What an engine does with a head whose ids it reads in the wrong numbering (docs/export.md): SGLang given HF
numbers feeds every feature one layer deeper (+1), vLLM or specdec given SGLang numbers one layer shallower
(-1). The shipped head's card measured teacher-forced greedy chain acceptance (train/evaluate.py
`chain_acceptance`); this rebuilds its two held-out sets from the held-out files this interpreter can see
(24 prompts of 128 tokens continued 256 tokens by the target's greedy decoding; 24 windows of 1024 tokens)
and measures the same thing for each reading. "Output of layer L - 1" is the last layer's pre-norm output,
what SGLang would capture as id L - 1.

    python docs/export_layer_shift.py [--threads 2]   # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from specdec.drafters.eagle import shipped_head_dir
from specdec.heads.eagle3 import load_head
from specdec.models.loading import load_causal_lm
from specdec.train.corpus import CorpusConfig, collect_files, iter_texts
from specdec.train.evaluate import chain_acceptance
from specdec.train.tokenizer import EOS


def heldout_stream(tokenizer) -> np.ndarray:
    """The held-out split (by file name) tokenized as `specdec train-lm --stage prepare` does: EOS after each."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    texts = list(iter_texts([f for f in collect_files(CorpusConfig()) if f.held_out]))
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.asarray(x + [eos], dtype=np.int64) for x in ids])


def windows(stream: np.ndarray, seq_len: int, n: int) -> np.ndarray:
    picks = np.linspace(0, stream.size // seq_len - 1, num=n).astype(int)
    return np.stack([stream[i * seq_len : (i + 1) * seq_len] for i in picks])


@torch.inference_mode()
def greedy(model, prompts: np.ndarray, new_tokens: int) -> np.ndarray:
    rows = []
    for p in prompts:
        ids = torch.from_numpy(p)[None]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        rows.append(out[0].numpy())
    return np.stack(rows)


@torch.inference_mode()
def layer_states(model, rows: np.ndarray) -> list[dict[str, torch.Tensor]]:
    """Per window: ids [1, S], top [1, S] and states [L + 1, 1, S, H] in float16 (as the card's feature store
    cached them): entry i < L is the input of decoder layer i (HF's hidden_states[i]), entry L the last
    layer's output before the final norm (what SGLang's id L - 1 would capture)."""
    out_rows = []
    for row in rows:
        ids = torch.from_numpy(row)[None]
        last: list[torch.Tensor] = []
        hook = model.model.layers[-1].register_forward_hook(
            lambda _m, _a, o, last=last: last.append(o[0] if isinstance(o, tuple) else o)
        )
        try:
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
        finally:
            hook.remove()
        states = torch.stack([*out.hidden_states[:-1], last[0]]).half()
        out_rows.append({"ids": ids, "top": out.logits.argmax(-1), "states": states})
    return out_rows


class Store:
    """The part of train/features.py's FeatureStore that chain_acceptance reads, for one reading's layers."""

    def __init__(self, rows: list[dict[str, torch.Tensor]], hf_ids: tuple[int, ...]):
        self.rows, self.hf_ids, self.done = rows, list(hf_ids), len(rows)

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.rows[i] for i in indices]
        aux = [torch.cat(list(r["states"][self.hf_ids]), dim=-1).float() for r in rows]  # [1, S, 3H] each
        return {
            "ids": torch.cat([r["ids"] for r in rows]),
            "top": torch.cat([r["top"] for r in rows]),
            "aux": torch.cat(aux),
        }


def cached(path: Path, make) -> np.ndarray:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, make())
    return np.load(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/specdec-layer-shift"), help="token windows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm("default")
    head = load_head(shipped_head_dir(), model)
    trained = head.config.aux_layer_ids
    stream = cached(args.cache / "heldout.npy", lambda: heldout_stream(tokenizer))
    prompts = windows(stream, 128, 24)
    sets = {
        "greedy": (cached(args.cache / "greedy.npy", lambda: greedy(model, prompts, 256)), 127),
        "heldout": (windows(stream, 1024, 24), 0),
    }
    states = {kind: layer_states(model, rows) for kind, (rows, _) in sets.items()}
    for name, shift in (("trained layers", 0), ("one layer shallower", -1), ("one layer deeper", 1)):
        ids = tuple(i + shift for i in trained)
        result: dict = {"hf_ids": list(ids)}
        for kind, (_, start) in sets.items():
            r = chain_acceptance(head, Store(states[kind], ids), 6, start=start)
            by_depth = [round(a, 3) for a in r["acceptance_by_depth"]]
            result[kind] = {
                "tau": round(r["tau"], 3),
                "acceptance_by_depth": by_depth,
                "anchors": r["anchors"],
            }
        print(json.dumps({name: result}), flush=True)


if __name__ == "__main__":
    main()
