"""llama.cpp as the target runtime: specdec's drafting and acceptance over llama.cpp's forward.

On this project's CPU llama.cpp's one-token forward of the shipped target is ~1.6 ms against ~2.5 ms for
specdec's own fused PyTorch forward (`native`) and ~3.7 ms for transformers': its per-op overhead is close
to nothing, and plain decoding is almost all one-token forwards. This runtime converts the model to GGUF in
its own dtype (`specdec.runtime.gguf`), loads it through llama-cpp-python's C API and scores token trees
with llama.cpp's own batch semantics:

- every tree leaf is a KV sequence; a node belongs to the sequences of all leaves below it, so in llama.cpp's
  unified KV cache a node attends exactly to the committed past (which belongs to every sequence) and to its
  ancestors (the cells of its sequences at smaller positions); positions are past + depth;
- committing the accepted path keeps one sequence through the accepted node (`seq_keep`), drops the cells
  deeper than it (`seq_rm`) and renames it sequence 0: no KV data moves.

It returns logits only (llama.cpp exposes no intermediate hidden states), so drafters that read hidden
states (eagle, medusa) run on `native`. The model's KV cache is float32 for float32 models (llama.cpp's
default is float16), so the function computed is the model's own; `specdec.runtime.check` verifies that
against transformers at load.
"""

from __future__ import annotations

import ctypes
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from specdec.errors import InputError, UnsupportedModelError
from specdec.runner import Scores
from specdec.tree import DraftTree

MAX_SEQUENCES = 256  # leaves per tree (llama.cpp's LLAMA_MAX_SEQ); trees with more are scored in parts
MAX_TREE = 512  # tokens per decode call (the batch and micro-batch size)
_GGML_F32, _GGML_F16 = 0, 1


class LlamaCppModel:
    """A model loaded into llama.cpp once, with a pool of contexts (one per live generation)."""

    def __init__(self, model, threads: int | None = None) -> None:
        import llama_cpp

        from specdec.runtime.gguf import to_gguf

        self.lib = llama_cpp
        self.model = model
        self.vocab = model.config.vocab_size
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 4096
        self.threads = threads or torch.get_num_threads()
        self.dtype = next(model.parameters()).dtype
        self._dir = tempfile.TemporaryDirectory(prefix="specdec-gguf-")
        path = Path(self._dir.name) / "model.gguf"
        to_gguf(model, None, path)
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(_QUIET, ctypes.c_void_p())
        params = llama_cpp.llama_model_default_params()
        self.handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.handle:
            raise UnsupportedModelError(
                f"llama.cpp could not load the GGUF conversion of {type(model).__name__}"
            )
        self._pool: list = []
        # freed when this object goes or at exit, while llama_cpp's functions still exist (__del__ can run
        # after the interpreter has torn them down)
        weakref.finalize(self, _free, llama_cpp, self.handle, self._pool)

    def context(self):
        """A context with an empty KV cache (from the pool, or new)."""
        lib = self.lib
        if self._pool:
            ctx = self._pool.pop()
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            return ctx
        params = lib.llama_context_default_params()
        params.n_ctx = self.max_positions + MAX_TREE
        params.n_batch = params.n_ubatch = MAX_TREE
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # one cache whose cells carry sequence sets: what tree scoring needs
        params.n_threads = params.n_threads_batch = self.threads
        kv_type = _GGML_F32 if self.dtype == torch.float32 else _GGML_F16
        params.type_k = params.type_v = kv_type
        # llama.cpp's CPU flash attention rounds through float16 (logits off by ~3e-4 relative on the shipped
        # model, against ~6e-7 without it): the plain attention path keeps float32 models in float32
        params.flash_attn_type = 0 if self.dtype == torch.float32 else -1
        ctx = lib.llama_init_from_model(self.handle, params)
        if not ctx:
            raise UnsupportedModelError("llama.cpp could not create a context for the model")
        return ctx

    def release(self, ctx) -> None:
        self._pool.append(ctx)


def _free(lib, handle, pool: list) -> None:
    """The pooled contexts first, then the model."""
    for ctx in pool:
        lib.llama_free(ctx)
    pool.clear()
    lib.llama_model_free(handle)


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, user_data) -> None:  # llama.cpp logs every load step to stderr otherwise
    return None


class LlamaCppRunner:
    """One generation's llama.cpp context: the target runtime surface (reset, prefill, score, commit, free)
    plus `start`/`extend`/`cache.crop` for the cost model's timing."""

    name = "llamacpp"

    def __init__(self, shared: LlamaCppModel) -> None:
        self.shared = shared
        self.lib = shared.lib
        self.ctx = None
        self.batch = None
        self.length = 0
        self.forwards = 0
        self.cache = self  # the cost model rolls back with runner.cache.crop(n)

    @property
    def max_positions(self) -> int:
        return self.shared.max_positions

    def reset(self, positions: int, slack: int = 0) -> None:
        if positions > self.shared.max_positions:
            raise InputError(f"{positions} positions exceed the model's {self.shared.max_positions}")
        if self.ctx is None:
            self.ctx = self.shared.context()
            self.batch = self.lib.llama_batch_init(MAX_TREE, 0, MAX_SEQUENCES)
        else:
            self.lib.llama_memory_clear(self._memory(), True)
        self.length = 0
        self.forwards = 0

    def _memory(self):
        return self.lib.llama_get_memory(self.ctx)

    def _decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[Sequence[int]],
        outputs: Sequence[bool],
    ) -> None:
        batch = self.batch
        assert batch is not None, "reset() comes first"
        n = len(tokens)
        for i in range(n):
            batch.token[i] = tokens[i]
            batch.pos[i] = positions[i]
            batch.n_seq_id[i] = len(seqs[i])
            row = batch.seq_id[i]
            for j, s in enumerate(seqs[i]):
                row[j] = s
            batch.logits[i] = outputs[i]
        batch.n_tokens = n
        status = self.lib.llama_decode(self.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status} ({n} tokens at {positions[0]})")

    def _logits(self, rows: int) -> torch.Tensor:
        """The last decode's output rows [rows, V], copied (llama.cpp reuses the buffer)."""
        pointer = self.lib.llama_get_logits(self.ctx)
        array = np.ctypeslib.as_array(pointer, shape=(rows, self.shared.vocab))
        out = torch.from_numpy(array.copy())
        return out if self.shared.dtype == torch.float32 else out.to(self.shared.dtype)

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """Run the tokens causally into the cache (sequence 0), in chunks of the batch size."""
        if layers:
            raise UnsupportedModelError("the llamacpp runtime returns no hidden states")
        for start in range(0, len(token_ids), MAX_TREE):
            chunk = token_ids[start : start + MAX_TREE]
            last = start + len(chunk) == len(token_ids)
            self._decode(
                chunk,
                range(self.length, self.length + len(chunk)),
                [(0,)] * len(chunk),
                [last and i == len(chunk) - 1 for i in range(len(chunk))],
            )
            self.length += len(chunk)
        self.forwards += 1
        return Scores(self._logits(1) if token_ids else torch.empty(0), {})

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        """One decode over the tree nodes: logits [N, V], row i for node i."""
        if layers:
            raise UnsupportedModelError("the llamacpp runtime returns no hidden states")
        n = len(tree)
        if n > MAX_TREE:
            raise InputError(f"a tree of {n} nodes exceeds the llamacpp runtime's {MAX_TREE}")
        parents = tree.parents
        has_child = [False] * n
        for p in parents[1:]:
            has_child[p] = True
        leaves = [i for i in range(n) if not has_child[i]]
        if len(leaves) > MAX_SEQUENCES:
            raise InputError(
                f"a tree with {len(leaves)} leaves exceeds the llamacpp runtime's {MAX_SEQUENCES}"
            )
        seqs: list[list[int]] = [[] for _ in range(n)]
        self.leaf_seq = {}
        for s, leaf in enumerate(leaves):  # sequence s = the path root..leaf
            node = leaf
            while node >= 0:
                seqs[node].append(s)
                node = parents[node]
            self.leaf_seq[leaf] = s
        memory = self._memory()
        for s in range(1, len(leaves)):  # the committed past (sequence 0) is visible to every sequence
            self.lib.llama_memory_seq_cp(memory, 0, s, -1, -1)
        self._decode(tree.tokens, [self.length + d for d in tree.depths], seqs, [True] * n)
        self.forwards += 1
        self._tree = tree
        return Scores(self._logits(n), {})

    def commit(self, tree_start: int, accepted_nodes: list[int]) -> None:
        """Keep the accepted root..node path as sequence 0, drop every other tree cell."""
        tree, memory, lib = self._tree, self._memory(), self.lib
        last = accepted_nodes[-1]
        node = last  # any leaf below the last accepted node names a sequence through the whole path
        children = {p: i for i, p in enumerate(tree.parents) if p >= 0}
        while node in children:
            node = children[node]
        s = self.leaf_seq[node]
        lib.llama_memory_seq_keep(memory, s)
        lib.llama_memory_seq_rm(memory, s, tree_start + len(accepted_nodes), -1)
        if s != 0:
            lib.llama_memory_seq_cp(memory, s, 0, -1, -1)
            lib.llama_memory_seq_rm(memory, s, -1, -1)
        self.length = tree_start + len(accepted_nodes)

    def crop(self, length: int) -> None:
        lib = self.lib
        lib.llama_memory_seq_rm(self._memory(), -1, length, -1)
        self.length = min(self.length, length)

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        self.reset(positions, slack)
        return self.prefill(prompt_ids).logits[-1]

    def free(self) -> None:
        if self.ctx is not None:
            self.lib.llama_batch_free(self.batch)
            self.shared.release(self.ctx)
            self.ctx = self.batch = None
