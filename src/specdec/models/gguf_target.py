"""A GGUF file as the target: llama.cpp's forward of the file, its own tokenizer, EOS ids and chat template.

The engine, the drafters and the cost model read a target through a few attributes of a transformers model:
its config (vocabulary, context, layers), its generation config (EOS ids) and where its parameters live.
`GGUFTarget` gives those from the file as llama.cpp loaded it, and the runtime is llama.cpp's forward of it
(`specdec.runtime.select_runtime` offers nothing else for a GGUF target), through the one runtime protocol
(`specdec.runtime.base`). Lossless means equal to what llama.cpp itself decodes from the file: greedy output is
llama-cpp-python's plain greedy loop's, and sampling draws from the distribution llama.cpp's logits define.

eagle cannot run on it (it reads inner hidden states; llama.cpp returns the final one only), nor can layerskip
(it runs the target's weights in PyTorch). A draft model of the same vocabulary can (a GGUF file too: then
llama.cpp runs both), and so can medusa and hydra heads trained for the model the file holds (they read the
final hidden state, which llama.cpp returns; hydra reads the token embeddings too, `get_input_embeddings`).
Recurrent, hybrid and diffusion architectures are refused: their state cannot be cut back to an accepted path
the way an attention cache can.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from specdec.errors import InputError

# positions a GGUF target's contexts hold unless asked otherwise (`GGUFTarget(path, context=...)`; never more
# than the file's training context): that is often 32-128k positions, whose float16 KV cache alone can take
# gigabytes
DEFAULT_CONTEXT = 8192


class GGUFTarget:
    """A GGUF file loaded into llama.cpp, described the way the engine reads a transformers model."""

    # trees are scored through llama.cpp's KV sequences (`specdec.runtime.llamacpp`), not through a 4D mask a
    # model's code could ignore: the check `specdec.runtime.check.check_tree_attention` runs has nothing to test
    _specdec_tree_ok = True

    def __init__(self, path: str | Path, context: int = DEFAULT_CONTEXT, threads: int | None = None) -> None:
        from transformers import GenerationConfig, PretrainedConfig

        from specdec.runtime.gguf import llamacpp_reason
        from specdec.runtime.llamacpp import LlamaCppModel

        reason = llamacpp_reason()
        if reason:
            raise InputError(f"a GGUF target needs llama.cpp: {reason}")
        self.path = Path(path)
        self.shared = LlamaCppModel.from_file(self.path, context, threads)
        lib, handle = self.shared.lib, self.shared.handle
        self.architecture = meta_string(lib, handle, "general.architecture") or "unknown"
        buf = ctypes.create_string_buffer(256)
        lib.llama_model_desc(handle, buf, len(buf))
        self.description = buf.value.decode("utf-8", errors="replace")  # e.g. "llama 1B Q8_0"
        for test, kind in (
            (lib.llama_model_is_recurrent, "recurrent"),
            (lib.llama_model_is_hybrid, "hybrid (attention with recurrent layers)"),
            (lib.llama_model_is_diffusion, "diffusion"),
        ):
            if test(handle):
                raise InputError(
                    f"{str(self.path)!r} holds a {kind} model ({self.architecture}): speculative decoding needs "
                    "an attention cache that can be cut back to the accepted tokens"
                )
        vocab = lib.llama_model_get_vocab(handle)
        end = [t for t in range(self.shared.vocab) if lib.llama_vocab_is_eog(vocab, t)]
        # a generic config holds any attribute given (its annotations name only the common ones)
        self.config = PretrainedConfig(
            vocab_size=self.shared.vocab,  # type: ignore[call-arg]
            hidden_size=self.shared.hidden_size,
            num_hidden_layers=self.shared.final_layer,
            max_position_embeddings=self.shared.max_positions,
            architectures=[self.architecture],
        )
        self.generation_config = GenerationConfig(eos_token_id=end or None)
        self._anchor = torch.empty(0)  # where "its parameters" are, for code that asks: the CPU
        self._embeddings: torch.nn.Embedding | None = None

    def parameters(self):
        return iter([self._anchor])

    def get_input_embeddings(self) -> torch.nn.Embedding:
        """The file's token embeddings [V, H] in float32 (dequantized by gguf-py), read on first use: hydra's
        heads read the embeddings of the tokens on a draft path."""
        if self._embeddings is None:
            import gguf

            reader = gguf.GGUFReader(self.path)
            tensor = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
            if tensor is None:
                raise InputError(f"{str(self.path)!r} holds no token_embd.weight tensor")
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [V, H] float32
            weight = torch.from_numpy(values.reshape(self.shared.vocab, self.shared.hidden_size).copy())
            self._embeddings = torch.nn.Embedding.from_pretrained(weight)
        return self._embeddings

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def __repr__(self) -> str:
        return f"GGUFTarget({str(self.path)!r}, {self.architecture})"


def meta_string(lib, handle, key: str) -> str | None:
    """A string value of the file's metadata, None when it has no such key."""
    buf = ctypes.create_string_buffer(4096)
    n = lib.llama_model_meta_val_str(handle, key.encode(), buf, len(buf))
    return buf.value.decode("utf-8", errors="replace") if n >= 0 else None


class LlamaCppTokenizer:
    """The file's own tokenizer, through llama.cpp (what a llama.cpp user's text becomes), with the part of a
    transformers tokenizer's interface specdec uses: call, decode, EOS/BOS ids, the chat template."""

    def __init__(self, target: GGUFTarget) -> None:
        self.lib, self.target = target.shared.lib, target
        self.vocab = self.lib.llama_model_get_vocab(target.shared.handle)
        self.add_bos = bool(self.lib.llama_vocab_get_add_bos(self.vocab))
        eos, bos = self.lib.llama_vocab_eos(self.vocab), self.lib.llama_vocab_bos(self.vocab)
        self.eos_token_id = eos if eos >= 0 else None
        self.bos_token_id = bos if bos >= 0 else None
        template = self.lib.llama_model_chat_template(target.shared.handle, None)
        self.chat_template = template.decode("utf-8", errors="replace") if template else None
        self.all_special_ids = [t for t in range(len(self)) if self.lib.llama_vocab_is_control(self.vocab, t)]
        self._pieces: dict[tuple[int, bool], bytes] = {}

    def __len__(self) -> int:
        return self.target.shared.vocab

    def get_vocab(self) -> dict[str, int]:
        """token text -> id, the file's own token strings (what a Hugging Face tokenizer's `get_vocab` holds
        for the tokenizer the file was converted from)."""
        text = self.lib.llama_vocab_get_text
        return {text(self.vocab, t).decode("utf-8", errors="replace"): t for t in range(len(self))}

    def __call__(self, text: str, add_special_tokens: bool = True, **_: object) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` as llama.cpp tokenizes it (special tokens written in it parsed as such, as
        transformers' tokenizers do; BOS first where the file asks for one)."""
        data = text.encode("utf-8")
        size = len(data) + 2
        for _ in range(2):  # a negative count is the size needed
            ids = (ctypes.c_int * size)()
            n = self.lib.llama_tokenize(
                self.vocab, data, len(data), ids, size, add_special_tokens and self.add_bos, True
            )
            if n >= 0:
                return list(ids[:n])
            size = -n
        raise InputError("llama.cpp could not tokenize the text")

    def decode(self, ids: list[int], skip_special_tokens: bool = False, **_: object) -> str:
        """The text of the ids (bytes joined, then UTF-8: a character cut at the end shows as U+FFFD)."""
        return b"".join(self._piece(t, not skip_special_tokens) for t in ids).decode(
            "utf-8", errors="replace"
        )

    def _piece(self, token: int, special: bool) -> bytes:
        """The token's bytes (kept: the engine decodes its text incrementally, every token twice or more)."""
        key = (token, special)
        piece = self._pieces.get(key)
        if piece is None:
            piece = self._pieces[key] = self._read_piece(token, special)
        return piece

    def _read_piece(self, token: int, special: bool) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, special)
        return buf.raw[: max(n, 0)]

    def apply_chat_template(
        self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True, **_: object
    ):
        """The file's chat template (`tokenizer.chat_template`) over the messages, rendered as
        llama-cpp-python's chat handler renders it."""
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        if not self.chat_template:
            raise InputError(f"{str(self.target.path)!r} carries no chat template")
        piece = self._piece
        eos = piece(self.eos_token_id, True).decode() if self.eos_token_id is not None else ""
        bos = piece(self.bos_token_id, True).decode() if self.bos_token_id is not None else ""
        formatter = Jinja2ChatFormatter(
            self.chat_template, eos_token=eos, bos_token=bos, add_generation_prompt=add_generation_prompt
        )
        text = formatter(messages=messages).prompt  # type: ignore[arg-type]
        return self.encode(text, add_special_tokens=False) if tokenize else text


def load_gguf(path: Path, context: int = DEFAULT_CONTEXT) -> tuple[GGUFTarget, LlamaCppTokenizer]:
    """The target and tokenizer of a GGUF file; InputError (one line) for a file llama.cpp cannot use."""
    target = GGUFTarget(path, context)
    return target, LlamaCppTokenizer(target)


# `--quantize` kinds: llama.cpp's file types (LLAMA_FTYPE_MOSTLY_*)
QUANTIZE = {"q8_0": 7, "q4_k_m": 15}


def cache_folder() -> Path:
    """Where converted files are kept: $SPECDEC_CACHE, else $XDG_CACHE_HOME/specdec, else ~/.cache/specdec."""
    import os

    root = os.environ.get("SPECDEC_CACHE")
    if root:
        return Path(root)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "specdec"


def quantized(model, tokenizer, source: str, kind: str) -> Path:
    """The GGUF file of a transformers `model` (loaded from `source`) quantized to `kind` by llama.cpp's
    quantizer, written through specdec's GGUF writer; kept in `cache_folder()` under a name that changes with
    the source's files (their sizes and times), so a second run loads it at once."""
    import hashlib
    import os
    import tempfile

    import llama_cpp

    from specdec.runtime.gguf import to_gguf
    from specdec.runtime.llamacpp import QUIET_LOG

    if kind not in QUANTIZE:
        raise InputError(f"unknown --quantize {kind!r} (choose from {', '.join(QUANTIZE)})")
    local = Path(source)
    stamp = [str(local.resolve()) if local.exists() else source, str(next(model.parameters()).dtype)]
    if local.is_dir():
        stamp += [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in sorted(local.iterdir())]
    digest = hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16]
    target = cache_folder() / "gguf" / f"{local.name or 'model'}-{digest}-{kind}.gguf"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as folder:
        full = Path(folder) / "full.gguf"
        to_gguf(model, tokenizer, full)
        llama_cpp.llama_log_set(QUIET_LOG, ctypes.c_void_p())  # its per-tensor log would flood the terminal
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = QUANTIZE[kind]
        part = Path(folder) / "quantized.gguf"
        if llama_cpp.llama_model_quantize(str(full).encode(), str(part).encode(), params) != 0:
            raise InputError(f"llama.cpp could not quantize {source!r} to {kind}")
        os.replace(part, target)  # whole or not at all: a killed run leaves no half file in the cache
    return target
