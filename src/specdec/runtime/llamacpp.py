"""llama.cpp as the target runtime: specdec's drafting and acceptance over llama.cpp's forward.

llama.cpp's one-token forward of the shipped target is the cheapest of the three runtimes' on the CPUs
measured (docs/runtime.md), ahead of specdec's own fused PyTorch forward (`native`) and transformers': its
per-op overhead is close to nothing, and plain decoding is almost all one-token forwards. This runtime converts the model to GGUF in
its own dtype (`specdec.runtime.gguf`), loads it through llama-cpp-python's C API and scores token trees
with llama.cpp's own batch semantics:

- every tree leaf is a KV sequence; a node belongs to the sequences of all leaves below it, so in llama.cpp's
  unified KV cache a node attends exactly to the committed past (which belongs to every sequence) and to its
  ancestors (the cells of its sequences at smaller positions); positions are past + depth;
- committing the accepted path keeps one sequence through the accepted node (`seq_keep`), drops the cells
  deeper than it (`seq_rm`) and renames it sequence 0: no KV data moves;
- the prompt is prefilled by the native runtime, whose batched matrix products are faster than llama.cpp's
  (docs/runtime.md), and its keys and values are handed to llama.cpp as a sequence state
  (`llama_state_seq_set_data`, the layout llama.cpp itself writes, in the model's precision). The layout is
  proven at load (`probe_state_layout`: llama.cpp's next logits after a handed-over prompt are those after
  its own prefill); where it is not, llama.cpp prefills itself.

Besides logits it returns the final hidden state (the LM head's input, layer L in Hugging Face's numbering:
llama.cpp's output embeddings, unpooled), which is all Medusa and Hydra heads read; llama.cpp exposes no
intermediate layer, so eagle (three of them) runs on `native`. The KV cache is in the model's precision
(float32, bfloat16; llama.cpp's default is float16), as transformers' cache is, so the function computed is
the model's own;
`specdec.runtime.check` verifies that against transformers at load.
"""

from __future__ import annotations

import ctypes
import struct
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from specdec.errors import InputError, UnsupportedModelError
from specdec.runtime.base import Scores
from specdec.runtime.native import NativeCache, NativeModel, NativeRunner, pair_order
from specdec.tree import DraftTree

MAX_SEQUENCES = 256  # leaves per tree (llama.cpp's LLAMA_MAX_SEQ); trees with more are scored in parts
MAX_TREE = 512  # tokens per decode call (the batch and micro-batch size)
REUSE_MIN = 16  # a pooled context's cells are reused for a prompt sharing at least this many tokens with them
_GGML_F32, _GGML_F16, _GGML_BF16 = 0, 1, 30
# the KV cache in the model's own precision: what transformers' cache holds, and what native's prefill hands over
_KV_TYPES = {torch.float32: _GGML_F32, torch.float16: _GGML_F16, torch.bfloat16: _GGML_BF16}
_POOLING_NONE = 0


class LlamaCppModel:
    """A model loaded into llama.cpp once, with a pool of contexts (one per live generation): a transformers
    model converted to GGUF (`__init__`), or a user's GGUF file as it is (`from_file`)."""

    def __init__(self, model, threads: int | None = None) -> None:
        from specdec.runtime.gguf import NEOX, architecture, to_gguf

        text = model.config.get_text_config(decoder=True)
        self.vocab = model.config.vocab_size
        self.hidden_size = text.hidden_size
        # the only hidden state llama.cpp returns (see the docstring)
        self.final_layer = text.num_hidden_layers
        self.max_positions = getattr(model.config, "max_position_embeddings", None) or 4096
        self.dtype = next(model.parameters()).dtype
        with tempfile.TemporaryDirectory(prefix="specdec-gguf-", ignore_cleanup_errors=True) as folder:
            # removed once loaded (llama.cpp keeps its mapping of the file): a process killed later leaves
            # no model-sized file behind in the temp folder
            path = Path(folder) / "model.gguf"
            to_gguf(model, None, path)
            self._load(path, threads, repack=True)
        if not self.handle:
            raise UnsupportedModelError(
                f"llama.cpp could not load the GGUF conversion of {type(model).__name__}"
            )
        self.native: NativeModel | None = NativeModel(model)
        # native's keys are in rotary-pair order; llama.cpp's "neox" architectures keep transformers' order
        neox = architecture(model) in NEOX
        self.key_order = torch.argsort(pair_order(self.native.head_dim)) if neox else None
        self._start()

    @classmethod
    def from_file(cls, path: Path, context: int, threads: int | None = None) -> LlamaCppModel:
        """A GGUF file as it is (`specdec.models.gguf_target`): its logits are llama.cpp's own, in float32, with
        llama-cpp-python's default cache (float16, no flash attention), so that its plain loop over the same
        file is the reference; up to `context` positions (at most the file's training context). Loaded
        without llama.cpp's repacked weight buffers: decoding a quantized file with them crashed the process on
        a CPU with AMX (llama-cpp-python 0.3.36). InputError when llama.cpp cannot load the file."""
        self = cls.__new__(cls)
        self._load(path, threads, repack=False)
        if not self.handle:
            raise InputError(
                f"llama.cpp cannot load {str(path)!r}: a corrupt or truncated GGUF file, or an architecture "
                "this llama.cpp does not know"
            )
        lib, handle = self.lib, self.handle
        self.vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(handle))
        self.hidden_size = lib.llama_model_n_embd(handle)
        self.final_layer = lib.llama_model_n_layer(handle)
        self.max_positions = min(context, lib.llama_model_n_ctx_train(handle) or context)
        self.dtype = None  # the file's own types; the cache is llama.cpp's default
        self.native, self.key_order = None, None  # no transformers weights to prefill with
        self._start()
        return self

    def _load(self, path: Path, threads: int | None, repack: bool) -> None:
        import llama_cpp

        self.lib = llama_cpp
        self.threads = threads or torch.get_num_threads()
        llama_cpp.llama_backend_init()
        llama_cpp.llama_log_set(QUIET_LOG, ctypes.c_void_p())
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = repack
        self.handle = llama_cpp.llama_model_load_from_file(str(path).encode(), params)

    def _start(self) -> None:
        self._pool: list = []
        # a pooled context keeps the cells of its last generation: with this on, a prompt that starts as that
        # generation's committed tokens did keeps them (`acquire`; `specdec.runtime.prefix.attach` sets it)
        self.reuse_prefixes = False
        self._history: dict[int | None, list[int]] = {}  # pooled context (its address) -> committed tokens
        self.state_header = b""  # set by `probe_state_layout` when native prefills can be handed over
        self.v_transposed = True  # llama.cpp's V layout there (transposed without flash attention)
        # freed when this object goes or at exit, while llama_cpp's functions still exist (__del__ can run
        # after the interpreter has torn them down)
        weakref.finalize(self, _free, self.lib, self.handle, self._pool)

    def context(self):
        """A context with an empty KV cache (from the pool, or new)."""
        lib = self.lib
        if self._pool:
            ctx = self._pool.pop()
            lib.llama_memory_clear(lib.llama_get_memory(ctx), False)  # cells only: no 50 MB memset
            return ctx
        params = lib.llama_context_default_params()
        params.n_ctx = self.max_positions + MAX_TREE
        params.n_batch = params.n_ubatch = MAX_TREE
        params.n_seq_max = MAX_SEQUENCES
        params.kv_unified = True  # one cache whose cells carry sequence sets: what tree scoring needs
        params.n_threads = params.n_threads_batch = self.threads
        params.type_k = params.type_v = _KV_TYPES.get(self.dtype, _GGML_F16)
        # llama.cpp's CPU flash attention rounds through float16 (logits off by ~3e-4 relative on the shipped
        # model, against ~6e-7 without it): the plain attention path keeps float32 models in float32; over a
        # bfloat16 cache it was also the faster (SmolLM2-360M's shape, a 16-token tree after 512: 75-97 ms
        # against 118-120 with flash attention, which a float16 cache needs to be as fast; docs/runtime.md);
        # a GGUF file's own (dtype None) runs as llama-cpp-python's loop does, without it
        params.flash_attn_type = 0 if self.dtype in (torch.float32, torch.bfloat16, None) else -1
        # the final hidden states (unpooled: one per token) are switched on per decode, only where a head reads
        # them (`_decode`): with them on, llama.cpp makes every token of a decode an output, logits included
        # (a prefill's last row was then not where one output is read from, and its LM head ran over every
        # prompt token)
        params.embeddings = False
        params.pooling_type = _POOLING_NONE
        ctx = lib.llama_init_from_model(self.handle, params)
        if not ctx:
            raise UnsupportedModelError("llama.cpp could not create a context for the model")
        return ctx

    def release(self, ctx, tokens: Sequence[int] = ()) -> None:
        """Back to the pool, with the committed tokens its cells hold (kept for `acquire`)."""
        self._pool.append(ctx)
        if self.reuse_prefixes:
            self._history[ctypes.cast(ctx, ctypes.c_void_p).value] = list(tokens)

    def acquire(self, tokens: list[int]) -> tuple[object, int]:
        """(a context for a generation whose prompt is `tokens`, the prompt tokens already in its cells): the
        pooled context whose last generation shares the longest prefix with it, cut to that prefix (at least
        REUSE_MIN tokens, and never the prompt's last, whose logits the prefill returns), else an empty one."""
        best, common = None, 0
        for i, ctx in enumerate(self._pool):
            seen = self._history.get(ctypes.cast(ctx, ctypes.c_void_p).value, [])
            n = next((j for j, (a, b) in enumerate(zip(seen, tokens[:-1], strict=False)) if a != b), None)
            n = min(len(seen), len(tokens) - 1) if n is None else n
            if n > common:
                best, common = i, n
        if best is None or common < REUSE_MIN:
            return self.context(), 0
        ctx = self._pool.pop(best)
        self.lib.llama_memory_seq_rm(self.lib.llama_get_memory(ctx), -1, common, -1)
        return ctx, common

    def probe_state_layout(self) -> None:
        """Hand native prefills over only in a layout proven here: after a 3-token prompt prefilled by native
        and handed over, llama.cpp's next forward must give the logits it gives after prefilling the prompt
        itself (the state's header and its V layout, transposed or not, are read from the state llama.cpp
        wrote for that prefill). Else `state_header` stays empty and llama.cpp prefills."""
        if self.native is None:  # a GGUF file: llama.cpp prefills
            return
        prompt, token = [i % self.vocab for i in (1, 2, 3)], [4 % self.vocab]
        own = LlamaCppRunner(self)
        own.reset(8)
        own._prefill_llamacpp(prompt)
        lib, ctx = self.lib, own.ctx
        size = lib.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        lib.llama_state_seq_get_data(ctx, buf, size, 0)
        data = bytes(buf)
        # after the header, the cell count and the cells: whether V is stored transposed, then the layer count
        self.v_transposed = struct.unpack_from("<I", data, 16 + 12 * len(prompt))[0] == 1
        want = own.extend(token).float()
        own.free()
        self.state_header = data[:12]
        runner = LlamaCppRunner(self)
        try:
            runner.reset(8)
            runner.prefill(prompt)
            got = runner.extend(token).float()
        except RuntimeError:  # llama.cpp refused the state
            got = None
        finally:
            runner.free()
        bound = 0.02 * float(want.max() - want.min())  # rounding differs; a wrong layout is far off
        if got is None or float((got - want).abs().max()) > bound:
            self.state_header = b""


def _free(lib, handle, pool: list) -> None:
    """The pooled contexts first, then the model."""
    for ctx in pool:
        lib.llama_free(ctx)
    pool.clear()
    lib.llama_model_free(handle)


def state_bytes(
    header: bytes,
    cache: NativeCache,
    n: int,
    v_transposed: bool = True,
    key_order: torch.Tensor | None = None,
) -> np.ndarray:
    """A llama.cpp sequence state (one stream, sequence 0) holding the native cache's first n positions in
    its own precision (float32, bfloat16 or float16), as uint8: header, cell count, per cell (position, 1
    sequence, id 0), then per layer the keys [n, kv_heads * D] and, after all keys, per layer the values:
    transposed [kv_heads * D, n] (llama.cpp's layout without flash attention) or like the keys. Native keys
    are in rotary-pair order, GGUF's for the llama architecture; `key_order` permutes each head's dimensions
    into another's (transformers' order, for qwen2 and qwen3). Written in place into one buffer: for a
    2,000-token prompt of the shipped model in float32 it is ~37 MB."""
    k = cache.k[:, 0, :, :n].detach()  # [L, kv_heads, n, D]
    if key_order is not None:
        k = k[..., key_order]
    v = cache.v[:, 0, :, :n].detach()
    layers, kv, _, d = k.shape
    row, size = kv * d, k.element_size()
    kv_type = _KV_TYPES[k.dtype]
    meta = np.zeros((n, 3), dtype=np.uint32)
    meta[:, 0] = np.arange(n)
    meta[:, 1] = 1
    head = header + struct.pack("<I", n) + meta.tobytes() + struct.pack("<II", int(v_transposed), layers)
    k_head = struct.pack("<iQ", kv_type, row * size)
    v_head = struct.pack("<iII", kv_type, size, row) if v_transposed else k_head
    block = n * row * size
    out = np.empty(len(head) + layers * (len(k_head) + len(v_head) + 2 * block), dtype=np.uint8)
    at = 0

    def put(raw: bytes) -> None:
        nonlocal at
        out[at : at + len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        at += len(raw)

    def put_values(t: torch.Tensor) -> None:  # t: a permuted view, copied straight into the buffer
        nonlocal at
        raw = torch.from_numpy(out[at : at + block].view(np.int32 if size == 4 else np.int16))
        raw.view(t.dtype).view(t.shape).copy_(t)
        at += block

    put(head)
    for layer in range(layers):
        put(k_head)
        put_values(k[layer].transpose(0, 1).reshape(n, row))
    for layer in range(layers):
        put(v_head)
        put_values(
            v[layer].transpose(1, 2).reshape(row, n)
            if v_transposed
            else v[layer].transpose(0, 1).reshape(n, row)
        )
    return out


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def QUIET_LOG(level, text, user_data) -> None:  # llama.cpp logs every load step to stderr otherwise
    return None


class LlamaCppRunner:
    """One generation's llama.cpp context (`specdec.runtime.base.Runtime`)."""

    name = "llamacpp"

    def __init__(self, shared: LlamaCppModel) -> None:
        self.shared = shared
        self.lib = shared.lib
        self.ctx: Any = None  # llama.cpp's context (a ctypes pointer), from the model's pool
        self.batch: Any = None
        self.length = 0
        self.forwards = 0
        self.cached_tokens = 0  # prompt tokens whose cells a pooled context still held (`acquire`)
        self.tokens: list[int] = []  # the committed tokens, as the cells hold them

    @property
    def max_positions(self) -> int:
        return self.shared.max_positions

    def reset(self, positions: int, slack: int = 0) -> None:
        if positions > self.shared.max_positions:
            raise InputError(f"{positions} positions exceed the model's {self.shared.max_positions}")
        if self.batch is None:
            self.batch = self.lib.llama_batch_init(MAX_TREE, 0, MAX_SEQUENCES)
        if self.shared.reuse_prefixes:  # the context is picked by the prompt (`prefill`)
            if self.ctx is not None:
                self.shared.release(self.ctx, self.tokens[: self.length])
                self.ctx = None
        elif self.ctx is None:
            self.ctx = self.shared.context()
        else:
            self.lib.llama_memory_clear(self._memory(), False)
        self.length = self.cached_tokens = 0
        self.tokens = []
        self.forwards = 0

    def _memory(self):
        return self.lib.llama_get_memory(self.ctx)

    def _decode(
        self,
        tokens: Sequence[int],
        positions: Sequence[int],
        seqs: Sequence[Sequence[int]],
        outputs: Sequence[bool],
        hidden: bool = False,
    ) -> None:
        """One llama_decode; `hidden`: the final hidden states of every token too (then all are outputs)."""
        batch = self.batch
        assert batch is not None, "reset() comes first"
        self.lib.llama_set_embeddings(self.ctx, hidden)
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
        dtype = self.shared.dtype
        return out if dtype in (torch.float32, None) else out.to(dtype)

    def _check_layers(self, layers: Sequence[int]) -> None:
        if any(layer != self.shared.final_layer for layer in layers):
            raise UnsupportedModelError(
                f"the llamacpp runtime returns the final hidden state (layer {self.shared.final_layer}) only, "
                f"not layers {sorted(set(layers) - {self.shared.final_layer})}"
            )

    def _hidden(self, rows: int, layers: Sequence[int]) -> dict[int, torch.Tensor]:
        """{final layer: the last decode's output rows' final hidden states [rows, H]} when asked, else {}."""
        if not layers:
            return {}
        pointer = self.lib.llama_get_embeddings(self.ctx)
        array = np.ctypeslib.as_array(pointer, shape=(rows, self.shared.hidden_size))
        hidden = torch.from_numpy(array.copy())
        return {
            self.shared.final_layer: hidden if self.shared.dtype is None else hidden.to(self.shared.dtype)
        }

    def prefill(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """Run the tokens causally into the cache (sequence 0): by the native runtime, handed over as a
        sequence state, where the layout is known (module docstring), else by llama.cpp in batches."""
        self._check_layers(layers)
        if self.ctx is None:  # prefixes reused: the pooled context that holds most of this prompt
            self.ctx, self.length = self.shared.acquire(token_ids)
            self.cached_tokens = 0 if layers else self.length
            if layers:  # hidden states of every prompt token are asked for: none from a cache
                self.lib.llama_memory_clear(self._memory(), False)
                self.length = 0
        self.tokens = list(token_ids)
        native = self.shared.native
        if not token_ids or not self.shared.state_header or native is None or self.length:
            return self._prefill_llamacpp(token_ids[self.length :], layers)
        runner = NativeRunner(native)
        runner.reset(len(token_ids))
        scores = runner.prefill(token_ids, layers)
        assert runner.cache is not None  # reset() made it
        shared = self.shared
        data = state_bytes(
            shared.state_header, runner.cache, len(token_ids), shared.v_transposed, shared.key_order
        )
        pointer = data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        if self.lib.llama_state_seq_set_data(self.ctx, pointer, data.size, 0) != data.size:
            raise RuntimeError("llama.cpp refused the prefilled sequence state")
        self.length = len(token_ids)
        self.forwards += 1
        return scores

    def _prefill_llamacpp(self, token_ids: list[int], layers: Sequence[int] = ()) -> Scores:
        """In batches; with `layers`, every position is an output (its hidden state is returned)."""
        hidden: list[torch.Tensor] = []
        rows = 1
        for start in range(0, len(token_ids), MAX_TREE):
            chunk = token_ids[start : start + MAX_TREE]
            last = start + len(chunk) == len(token_ids)
            outputs = [bool(layers) or (last and i == len(chunk) - 1) for i in range(len(chunk))]
            positions = range(self.length, self.length + len(chunk))
            self._decode(chunk, positions, [(0,)] * len(chunk), outputs, hidden=bool(layers))
            rows = sum(outputs)
            hidden.extend(self._hidden(rows, layers).values())
            self.length += len(chunk)
        self.forwards += 1
        if not token_ids:
            return Scores(torch.empty(0), {})
        logits = self._logits(rows)[-1:]  # the last position's
        return Scores(logits, {self.shared.final_layer: torch.cat(hidden)} if layers else {})

    def score(self, tree: DraftTree, layers: Sequence[int] = ()) -> Scores:
        """One decode over the tree nodes: logits [N, V], row i for node i."""
        self._check_layers(layers)
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
        leaf_seq: dict[int, int] = {}  # leaf -> its sequence id, which commit keeps
        for s, leaf in enumerate(leaves):  # sequence s = the path root..leaf
            node = leaf
            while node >= 0:
                seqs[node].append(s)
                node = parents[node]
            leaf_seq[leaf] = s
        memory = self._memory()
        for s in range(1, len(leaves)):  # the committed past (sequence 0) is visible to every sequence
            self.lib.llama_memory_seq_cp(memory, 0, s, -1, -1)
        self._decode(
            tree.tokens, [self.length + d for d in tree.depths], seqs, [True] * n, hidden=bool(layers)
        )
        self.forwards += 1
        return Scores(self._logits(n), self._hidden(n, layers), self.length, tree, leaf_seq)

    def commit(self, scores: Scores, accepted_nodes: list[int]) -> None:
        """Keep the accepted root..node path as sequence 0, drop every other tree cell."""
        tree, memory, lib, tree_start = scores.tree, self._memory(), self.lib, scores.start
        assert tree is not None, "commit() takes the scores of a tree"
        last = accepted_nodes[-1]
        node = last  # any leaf below the last accepted node names a sequence through the whole path
        children = {p: i for i, p in enumerate(tree.parents) if p >= 0}
        while node in children:
            node = children[node]
        s = scores.handle[node]
        end = tree_start + len(accepted_nodes)
        # each of these walks every cell of the cache: a chain (one sequence, 0) keeps its cells but the
        # rejected tail's, and a root alone accepted (plain decoding) has nothing to drop
        if len(scores.handle) > 1:
            lib.llama_memory_seq_keep(memory, s)
        if end < tree_start + len(tree):
            lib.llama_memory_seq_rm(memory, s, end, -1)
        if s != 0:
            lib.llama_memory_seq_cp(memory, s, 0, -1, -1)
            lib.llama_memory_seq_rm(memory, s, -1, -1)
        self.length = end
        self.tokens += [tree.tokens[i] for i in accepted_nodes]

    def crop(self, length: int) -> None:
        lib = self.lib
        lib.llama_memory_seq_rm(self._memory(), -1, length, -1)
        self.length = min(self.length, length)
        del self.tokens[length:]

    def start(self, prompt_ids: list[int], positions: int, slack: int = 0) -> torch.Tensor:
        self.reset(positions, slack)
        return self.prefill(prompt_ids).logits[-1]

    def extend(self, token_ids: list[int]) -> torch.Tensor:
        """Append tokens causally (sequence 0); their logits [T, V]."""
        out = []
        for start in range(0, len(token_ids), MAX_TREE):
            chunk = token_ids[start : start + MAX_TREE]
            self._decode(
                chunk, range(self.length, self.length + len(chunk)), [(0,)] * len(chunk), [True] * len(chunk)
            )
            out.append(self._logits(len(chunk)))
            self.length += len(chunk)
            self.tokens += chunk
        self.forwards += 1
        return torch.cat(out)

    def keep_prefix(self) -> None:
        """Nothing to copy: the cells stay in the context, which `free` pools with its committed tokens."""

    def free(self) -> None:
        if self.batch is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        if self.ctx is not None:
            self.shared.release(self.ctx, self.tokens[: self.length])
            self.ctx = None
