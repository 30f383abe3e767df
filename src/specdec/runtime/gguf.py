"""A Hugging Face model of a family the native runtime runs (Llama, Mistral, Qwen2, Qwen3) written as GGUF, for
llama.cpp (the `llamacpp` runtime and bench methods).

The model is written in its own dtype (float32 -> F32, 16-bit -> F16/BF16), so llama.cpp computes the same
function at the same precision. llama.cpp's architectures differ in how they rotate q and k: `llama` (Llama
and Mistral) rotates adjacent pairs, so its q/k rows are stored in rotary-pair order, the native runtime's
packing (`specdec.runtime.native`); `qwen2` and `qwen3` rotate the two halves of each head as transformers
does ("neox"), so their q/k rows, biases and per-head norms are written in transformers' own order.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from specdec.errors import InputError
from specdec.models.support import attention_window
from specdec.runtime.native import NativeModel, unsupported_reason

_FILE_TYPES = {torch.float32: "ALL_F32", torch.float16: "MOSTLY_F16", torch.bfloat16: "MOSTLY_BF16"}
# transformers' model type -> llama.cpp's architecture
ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
NEOX = {"qwen2", "qwen3"}  # architectures rotating the halves of a head (transformers' order), not pairs


def architecture(model) -> str:
    """llama.cpp's architecture for `model` (one `gguf_reason` accepts)."""
    return ARCHITECTURES[model.config.model_type]


def llamacpp_reason() -> str:
    """Why llama.cpp cannot be used here ("" when llama-cpp-python and gguf import)."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ModuleNotFoundError as e:
        return f"the llamacpp extra is not installed ({e.name}): pip install 'specdec[llamacpp]'"
    return ""


def gguf_reason(model) -> str:
    """Why `to_gguf` cannot write `model` ("" when it can)."""
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    reason = unsupported_reason(model)
    if reason:
        return reason
    kind = getattr(config, "model_type", None)
    if kind not in ARCHITECTURES:
        return f"model type {kind!r} (the GGUF conversion writes {', '.join(ARCHITECTURES)} models)"
    if ARCHITECTURES[kind] == "llama" and getattr(config, "attention_bias", False):
        return "attention biases"  # llama.cpp's llama architecture has none on q/k/v
    if getattr(config, "mlp_bias", False):
        return "an MLP bias"
    window = attention_window(config)
    if window is not None and window[1] < config.max_position_embeddings:
        return f"a {window[0]} attention of {window[1]} positions"  # llama.cpp runs these with full attention
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        return f"rope type {rope['rope_type']!r}"
    if next(model.parameters()).dtype not in _FILE_TYPES:
        return f"dtype {next(model.parameters()).dtype} (no GGUF type)"
    wide = getattr(config, "head_dim", None) not in (None, config.hidden_size // config.num_attention_heads)
    if wide and ARCHITECTURES[kind] == "llama":
        return "a head_dim other than hidden_size / num_attention_heads"
    return ""


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
    """Write `model` (a family the native runtime runs: `gguf_reason` says which it cannot) as a GGUF llama.cpp
    loads."""
    import gguf

    reason = gguf_reason(model)
    if reason:
        raise InputError(f"cannot convert {type(model).__name__} to GGUF: {reason}")
    config = model.config
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    dtype = next(model.parameters()).dtype
    native = NativeModel(model)
    h, kv, d = native.heads, native.kv_heads, native.head_dim
    arch = architecture(model)
    writer = gguf.GGUFWriter(str(path), arch)
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
    if tokenizer is None:  # token ids in, logits out: llama.cpp needs no vocabulary ("none")
        writer.add_tokenizer_model("none")
    else:
        tokens, merges = _tokenizer_vocab(tokenizer)
        special = set(tokenizer.all_special_ids)
        types = [
            gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))
        ]
        # a model whose vocabulary is larger than its tokenizer's (padded embeddings; `bench --scale`'s
        # shapes, read with the shipped tokenizer): llama.cpp needs a token for every row
        unused = range(len(tokens), config.vocab_size)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens + [f"<unused{i}>" for i in unused])
        writer.add_token_types(types + [gguf.TokenType.UNUSED] * len(unused))
        writer.add_token_merges(merges)
        if getattr(tokenizer, "chat_template", None):  # the chat endpoint of a GGUF target renders it
            writer.add_chat_template(tokenizer.chat_template)
    eos = model.generation_config.eos_token_id
    writer.add_eos_token_id(eos[0] if isinstance(eos, list) else eos)

    def add(name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous()
        if t.dim() == 1:  # norm weights: llama.cpp's CPU kernels multiply by them in float32 only (as its own
            t = t.float()  # converter writes them); a 16-bit one aborts the process in its first forward
        array = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
        raw = gguf.GGMLQuantizationType.BF16 if t.dtype == torch.bfloat16 else None
        if raw is not None:  # numpy has no bfloat16: hand over the raw 16-bit patterns
            array = t.view(torch.int16).numpy()
        writer.add_tensor(name, array, raw_dtype=raw)

    if rope.get("rope_type", "default") != "default":
        # llama.cpp divides each rotary frequency by its factor in rope_freqs: the base frequency over the
        # model's (scaled) one, whatever rule scaled it (linear, llama3)
        d_half = torch.arange(0, d, 2, dtype=torch.float32) / d
        base = 1.0 / float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))) ** d_half
        writer.add_tensor("rope_freqs.weight", (base / native.inv_freq).numpy())
    add("token_embd.weight", native.embed)
    add("output_norm.weight", native.norm)
    if native.lm_head.data_ptr() != native.embed.data_ptr():
        add("output.weight", native.lm_head)
    for i, w in enumerate(native.layers):
        q, k, v = w.wqkv_t.T.split([h * d, kv * d, kv * d])
        if arch in NEOX:  # transformers' own q/k order, their biases and per-head norms beside
            attn = model.model.layers[i].self_attn
            q, k = attn.q_proj.weight, attn.k_proj.weight
            extra = [(f"attn_{n}.bias", getattr(attn, f"{n}_proj").bias) for n in "qkv"]
            extra += [(f"attn_{n}_norm.weight", getattr(attn, f"{n}_norm", None)) for n in "qk"]
            for name, t in extra:
                if t is not None:
                    add(f"blk.{i}.{name}", t if isinstance(t, torch.Tensor) else t.weight)
        for name, t in (
            ("attn_norm", w.ln1),
            ("attn_q", q),
            ("attn_k", k),
            ("attn_v", v),
            ("attn_output", w.wo_t.T),
            ("ffn_norm", w.ln2),
            ("ffn_gate", w.wgu_t.T[: w.wgu_t.shape[1] // 2]),
            ("ffn_up", w.wgu_t.T[w.wgu_t.shape[1] // 2 :]),
            ("ffn_down", w.wdown_t.T),
        ):
            add(f"blk.{i}.{name}.weight", t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
