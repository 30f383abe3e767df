"""The target's hidden states on disk: the head trainer runs the target ONCE over fixed-length windows.

Per position the token id, the three auxiliary hidden states (concatenated, [3H]), the final normed hidden
state (the input of the target's lm_head, [H]) and the target's top token are written to numpy memmaps (16-bit
floats). Soft labels are recomputed on the fly from the final state (`specdec.train.teacher`), so the
full-vocabulary logits are never stored and epochs never re-run the target.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from specdec.errors import InputError
from specdec.train.head_corpus import DataConfig, greedy_windows, heldout_windows, load_stream, train_windows


@dataclass(frozen=True)
class FeatureSpec:
    seq_len: int  # window length the target reads (the head trains on segments of it: segment_len)
    n_seqs: int
    hidden_size: int
    aux_layer_ids: list[int]  # HF output_hidden_states indices == vLLM eagle_aux_hidden_state_layer_ids
    store_dtype: str = "float16"  # hidden states here stay far inside fp16's range (|h| < 100 measured)


class FeatureStore:
    """Memory-mapped per-window arrays: ids [N, S] int32, aux [N, S, 3H], final [N, S, H], top [N, S] int32.

    `done` (in meta.json, written after each flush) counts the windows already written, so an interrupted
    extraction resumes at the next window; `limit` <= done is how many of them training uses.
    """

    def __init__(self, root: Path, spec: FeatureSpec | None = None):
        self.root = root
        meta_path = root / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            self.spec = FeatureSpec(**meta["spec"])
            self.done = meta["done"]
            self.seconds = meta.get("seconds", 0.0)
            same = spec is None or {**asdict(spec), "n_seqs": 0} == {**asdict(self.spec), "n_seqs": 0}
            if not same:
                raise InputError(
                    f"{root} holds features of another shape ({self.spec}); remove it or use another --workdir"
                )
            mode = "r+"
        else:
            if spec is None:
                raise InputError(f"no features in {root}")
            root.mkdir(parents=True, exist_ok=True)
            self.spec, self.done, self.seconds, mode = spec, 0, 0.0, "w+"
        s = self.spec
        shapes = {
            "ids": ((s.n_seqs, s.seq_len), np.int32),
            "aux": ((s.n_seqs, s.seq_len, len(s.aux_layer_ids) * s.hidden_size), np.float16),
            "final": ((s.n_seqs, s.seq_len, s.hidden_size), np.float16),
            "top": ((s.n_seqs, s.seq_len), np.int32),
        }
        self.arrays = {
            name: np.lib.format.open_memmap(root / f"{name}.npy", mode=mode, dtype=dt, shape=shape)
            for name, (shape, dt) in shapes.items()
        }
        if mode == "w+":
            self._write_meta()
        self.limit = self.done  # windows training uses (prepare_features may lower it: --feature-tokens)

    def _write_meta(self) -> None:
        tmp = self.root / "meta.tmp"
        tmp.write_text(json.dumps({"spec": asdict(self.spec), "done": self.done, "seconds": self.seconds}))
        os.replace(tmp, self.root / "meta.json")

    def flush(self, done: int) -> None:
        for a in self.arrays.values():
            a.flush()
        self.done = self.limit = done
        self._write_meta()

    @property
    def complete(self) -> bool:
        return self.done >= self.spec.n_seqs

    def window(self, i: int) -> dict[str, torch.Tensor]:
        """One window as float32/int64 tensors: ids [S], aux [S, 3H], final [S, H], top [S]."""
        a = self.arrays
        return {
            "ids": torch.from_numpy(np.asarray(a["ids"][i], dtype=np.int64)),
            "aux": torch.from_numpy(np.asarray(a["aux"][i], dtype=np.float32)),
            "final": torch.from_numpy(np.asarray(a["final"][i], dtype=np.float32)),
            "top": torch.from_numpy(np.asarray(a["top"][i], dtype=np.int64)),
        }

    def batch(self, indices: list[int]) -> dict[str, torch.Tensor]:
        rows = [self.window(i) for i in indices]
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


@torch.inference_mode()
def target_features(model, ids: torch.Tensor, aux_layer_ids: list[int]) -> dict[str, torch.Tensor]:
    """One target forward over ids [B, S]: aux [B, S, 3H], final [B, S, H] (lm_head's input), top [B, S].

    `final` is captured by a hook on the output embeddings, so it is exactly what the lm_head reads whatever
    the architecture's final norm is called.
    """
    captured: list[torch.Tensor] = []
    lm_head = model.get_output_embeddings()
    handle = lm_head.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        out = model(input_ids=ids, output_hidden_states=True, use_cache=False)
    finally:
        handle.remove()
    hs = out.hidden_states  # entry i = input of decoder layer i (0 = embeddings output)
    aux = torch.cat([hs[i] for i in aux_layer_ids], dim=-1)
    return {"aux": aux, "final": captured[-1], "top": out.logits.argmax(-1)}


def extract(
    model,
    windows: np.ndarray,
    store: FeatureStore,
    batch: int = 1,
    desc: str = "features",
    limit: int | None = None,
) -> FeatureStore:
    """Run the target over windows [N, S] (token ids) into `store`, resuming at store.done, up to `limit`."""
    n = min(store.spec.n_seqs, limit or store.spec.n_seqs)
    bar = tqdm(total=n, initial=store.done, desc=desc, unit="win")
    t_last = time.monotonic()
    for start in range(store.done, n, batch):
        stop = min(start + batch, n)
        ids = torch.from_numpy(windows[start:stop].astype(np.int64))
        _write_rows(store, start, stop, ids, target_features(model, ids, store.spec.aux_layer_ids))
        bar.update(stop - start)
        now = time.monotonic()
        bar.set_postfix(tok_s=f"{ids.numel() / max(1e-9, now - t_last):.0f}")
        store.seconds += now - t_last
        t_last = now
        if stop % 16 == 0 or stop == n:
            store.flush(stop)
    bar.close()
    store.flush(max(n, store.done))
    return store


def _write_rows(
    store: FeatureStore, start: int, stop: int, ids: torch.Tensor, f: dict[str, torch.Tensor]
) -> None:
    a = store.arrays
    a["ids"][start:stop] = ids.numpy().astype(np.int32)
    a["aux"][start:stop] = f["aux"].float().numpy().astype(np.float16)
    a["final"][start:stop] = f["final"].float().numpy().astype(np.float16)
    if not (np.isfinite(a["aux"][start:stop]).all() and np.isfinite(a["final"][start:stop]).all()):
        raise InputError(
            "the target's hidden states exceed float16's range; this model cannot be cached here"
        )
    a["top"][start:stop] = f["top"].numpy().astype(np.int32)


def prepare_features(
    workdir: Path, model, corpus_dir: Path, aux_layer_ids: list[int], cfg: DataConfig
) -> dict[str, FeatureStore]:
    """Feature stores 'train', 'heldout' (real text) and 'greedy' (target's own continuations); resumable."""
    hidden = model.config.get_text_config(decoder=True).hidden_size
    held = load_stream(corpus_dir, "heldout")
    real = heldout_windows(held, cfg.seq_len, cfg.heldout_windows)
    prompt_rows = heldout_windows(held, cfg.greedy_prompt_len, cfg.greedy_prompts)
    greedy_path = workdir / "features" / "greedy" / "windows.npy"
    plans: list[tuple[str, Callable[[], np.ndarray], tuple[int, int]]] = [
        ("heldout", lambda: real, real.shape),
        (
            "greedy",
            lambda: _cached(greedy_path, lambda: greedy_windows(model, prompt_rows, cfg.greedy_new_tokens)),
            (len(prompt_rows), prompt_rows.shape[1] + cfg.greedy_new_tokens),
        ),
    ]
    train_stream = load_stream(corpus_dir, "train")
    n_train = min(max(1, cfg.feature_tokens // cfg.seq_len), train_stream.size // cfg.seq_len)
    stores = {}
    for name, make, shape in plans:
        store = FeatureStore(workdir / "features" / name, _spec(shape, hidden, aux_layer_ids))
        if not store.complete:
            extract(model, make(), store, desc=f"features {name}")
        stores[name] = store
    # The training windows are a seeded random order fixed when the store is created; a later, smaller
    # --feature-tokens uses a prefix of them (itself a uniform sample), a larger one extends up to the plan.
    store = FeatureStore(workdir / "features" / "train", _spec((n_train, cfg.seq_len), hidden, aux_layer_ids))
    if store.done < n_train:
        windows = train_windows(train_stream, cfg.seq_len, store.spec.n_seqs, cfg.seed)
        extract(model, windows, store, desc="features train", limit=n_train)
    store.limit = min(store.done, n_train)
    stores["train"] = store
    return stores


def _spec(shape: tuple[int, int], hidden: int, aux_layer_ids: list[int]) -> FeatureSpec:
    return FeatureSpec(
        seq_len=int(shape[1]), n_seqs=int(shape[0]), hidden_size=hidden, aux_layer_ids=list(aux_layer_ids)
    )


def _cached(path: Path, make: Callable[[], np.ndarray]) -> np.ndarray:
    if path.exists():
        return np.load(path)
    arr = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)
    return arr
