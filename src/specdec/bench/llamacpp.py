"""llama.cpp in the bench: the same model converted to GGUF, plain greedy decoding and its prompt lookup.

Needs the `llamacpp` extra (llama-cpp-python and gguf). The target is written to a temporary GGUF file in
its own dtype (float32 -> F32, 16-bit -> F16/BF16) with an F32 KV cache for float32 models, so llama.cpp
computes the same function at the same precision and its outputs go through the bench's lossless check like
every other method's. Greedy decoding only (llama.cpp's sampler draws from another random stream).

The conversion reuses the native runtime's packing: its q/k rows are already in the rotary-pair order that
GGUF's Llama layout uses (`specdec.runtime.native`).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from specdec.bench.runner import Method, Run
from specdec.errors import InputError
from specdec.runtime.native import NativeModel, unsupported_reason
from specdec.sampling import SamplingParams

LLAMACPP_METHODS = ("llamacpp", "llamacpp-lookup")
LOOKUP_TOKENS = 10  # drafted tokens per lookup step (llama-cpp-python's default, as hf-prompt-lookup's 10)
_FILE_TYPES = {torch.float32: "ALL_F32", torch.float16: "MOSTLY_F16", torch.bfloat16: "MOSTLY_BF16"}


def require_llamacpp() -> None:
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as e:
        raise InputError(
            f"the llamacpp bench methods need the llamacpp extra ({e.name} is not installed): "
            "pip install 'specdec[llamacpp]'"
        ) from None


def _tokenizer_vocab(tokenizer) -> tuple[list[str], list[str]]:
    """Token strings in id order and the BPE merges, from a fast tokenizer's JSON."""
    data = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = tokenizer.get_vocab()
    tokens = [""] * len(vocab)
    for text, i in vocab.items():
        tokens[i] = text
    merges = data["model"].get("merges", [])
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in merges]


def to_gguf(model, tokenizer, path: Path) -> None:
    """Write a Llama-family `model` (the families the native runtime runs) as a GGUF llama.cpp loads."""
    import gguf

    reason = unsupported_reason(model)
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", "default") != "default":
        reason = reason or f"rope type {rope['rope_type']!r}"
    if reason or config.model_type != "llama" or getattr(config, "attention_bias", False):
        raise InputError(
            f"llama.cpp comparison: only plain Llama models are converted here ({reason or config.model_type})"
        )
    dtype = next(model.parameters()).dtype
    if dtype not in _FILE_TYPES:
        raise InputError(f"llama.cpp comparison: no GGUF type for {dtype}")
    native = NativeModel(model)
    h, kv, d = native.heads, native.kv_heads, native.head_dim
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_key_length(d)
    writer.add_value_length(d)
    writer.add_rope_dimension_count(d)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[dtype]))
    writer.add_vocab_size(config.vocab_size)
    tokens, merges = _tokenizer_vocab(tokenizer)
    special = set(tokenizer.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    )
    writer.add_token_merges(merges)
    eos = model.generation_config.eos_token_id
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        array = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        raw = gguf.GGMLQuantizationType.BF16 if t.dtype == torch.bfloat16 else None
        if raw is not None:  # numpy has no bfloat16: hand over the raw 16-bit patterns
            array = t.view(torch.int16).numpy()
        writer.add_tensor(name, array, raw_dtype=raw)

    add("token_embd.weight", native.embed)
    add("output_norm.weight", native.norm)
    if native.lm_head.data_ptr() != native.embed.data_ptr():
        add("output.weight", native.lm_head)
    for i, w in enumerate(native.layers):
        q, k, v = w.wqkv.split([h * d, kv * d, kv * d])
        for name, t in (
            ("attn_norm", w.ln1),
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", v),
            ("attn_output", w.wo_t.T),
            ("ffn_norm", w.ln2),
            ("ffn_gate", w.wgu[: w.wgu.shape[0] // 2]),
            ("ffn_up", w.wgu[w.wgu.shape[0] // 2 :]),
            ("ffn_down", w.wdown_t.T),
        ):
            add(f"blk.{i}.{name}.weight", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


class LlamaCppMethod(Method):
    """llama.cpp's greedy decoding (plain, or with its prompt-lookup drafts) on the GGUF conversion."""

    family = "llama.cpp"

    def __init__(self, name: str, model, tokenizer, threads: int) -> None:
        require_llamacpp()
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        self.name = name
        self.runtime = "llama.cpp"
        self._dir = tempfile.TemporaryDirectory(prefix="specdec-gguf-")
        path = Path(self._dir.name) / "model.gguf"
        to_gguf(model, tokenizer, path)
        dtype = next(model.parameters()).dtype
        cache_type = 0 if dtype == torch.float32 else 1  # GGML_TYPE_F32 / F16: the model's own precision
        draft = (
            LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if name == "llamacpp-lookup" else None
        )
        self.llm = Llama(
            str(path),
            n_ctx=model.config.max_position_embeddings,
            n_batch=512,
            n_threads=threads,
            n_threads_batch=threads,
            type_k=cache_type,
            type_v=cache_type,
            draft_model=draft,
            logits_all=draft is not None,  # its lookup verifies drafts from every position's logits
            verbose=False,
        )
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.forwards = 0
        evaluate = self.llm.eval

        def counted(tokens) -> None:  # one llama.cpp decode call = one forward (the prefill included)
            self.forwards += 1
            evaluate(tokens)

        self.llm.eval = counted  # type: ignore[method-assign]

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        if not params.greedy:
            raise InputError("the llamacpp methods run greedy decoding only")
        self.llm.reset()  # no prompt-prefix reuse between runs: every method prefills every prompt
        self.forwards = 0
        out: list[int] = []
        start = time.perf_counter()
        for token in self.llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if token in self.eos or len(out) >= params.max_new_tokens:
                break
        seconds = time.perf_counter() - start
        return Run(out, seconds, max(0, self.forwards - 1))  # the prefill is not a tree forward
