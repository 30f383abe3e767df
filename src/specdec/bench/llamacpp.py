"""llama.cpp in the bench, as users run it: plain greedy decoding and its prompt-lookup speculation.

Needs the `llamacpp` extra. The target is converted to GGUF in its own dtype (`specdec.runtime.gguf`) and run
through llama-cpp-python's `Llama.generate` with the same precision settings as specdec's llamacpp runtime
(a float32 KV cache and no flash attention for float32 models, whose CPU kernel rounds through float16), so
its outputs go through the bench's lossless check like every other method's. Greedy decoding only
(llama.cpp's sampler draws from another random stream).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from specdec.bench.methods import Method, Run
from specdec.errors import InputError
from specdec.runtime.gguf import gguf_reason, llamacpp_reason, to_gguf
from specdec.sampling import SamplingParams

LLAMACPP_METHODS = ("llamacpp", "llamacpp-lookup")
LOOKUP_TOKENS = 10  # drafted tokens per lookup step (as hf-prompt-lookup's prompt_lookup_num_tokens=10)


def require_llamacpp(model=None) -> None:
    reason = llamacpp_reason() or (gguf_reason(model) if model is not None else "")
    if reason:
        raise InputError(f"the llamacpp bench methods cannot run: {reason}")


class LlamaCppMethod(Method):
    """llama.cpp's greedy decoding (plain, or with its prompt-lookup drafts) on the GGUF conversion of a
    transformers model, or on a GGUF target's own file with llama-cpp-python's default settings (the loop its
    users run, and the reference of that target's lossless check)."""

    family = "llama.cpp"

    def __init__(self, name: str, model, tokenizer, threads: int) -> None:
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

        from specdec.models.gguf_target import GGUFTarget

        self.name = name
        self.runtime = "llama.cpp (its own loop)"
        draft = (
            LlamaPromptLookupDecoding(num_pred_tokens=LOOKUP_TOKENS) if name == "llamacpp-lookup" else None
        )
        options: dict[str, Any] = {
            "n_ctx": model.config.max_position_embeddings,
            "n_batch": 512,
            "n_threads": threads,
            "n_threads_batch": threads,
            "draft_model": draft,
            "logits_all": draft is not None,  # its lookup verifies drafts from every position's logits
            "verbose": False,
        }
        if isinstance(model, GGUFTarget):
            self.llm = Llama(str(model.path), **options)
        else:
            require_llamacpp(model)
            # the file is removed once loaded (llama.cpp keeps its mapping): a killed bench leaves none behind
            folder = tempfile.TemporaryDirectory(prefix="specdec-gguf-", ignore_cleanup_errors=True)
            path = Path(folder.name) / "model.gguf"
            to_gguf(model, tokenizer, path)
            float32 = next(model.parameters()).dtype == torch.float32
            # GGML_TYPE_F32 / F16: the model's own precision
            precision: dict[str, Any] = {
                "type_k": 0 if float32 else 1,
                "type_v": 0 if float32 else 1,
                "flash_attn": not float32,
            }
            self.llm = Llama(str(path), **options, **precision)
            folder.cleanup()
        eos = model.generation_config.eos_token_id
        self.eos = set(eos if isinstance(eos, list) else [eos])
        self.forwards = 0
        evaluate = self.llm.eval

        def counted(tokens) -> None:  # one llama.cpp decode call = one forward (the prefill included)
            self.forwards += 1
            evaluate(tokens)

        self.llm.eval = counted  # type: ignore[method-assign]

    def run(self, prompt_ids: list[int], params: SamplingParams, force: list[int] | None = None) -> Run:
        from llama_cpp import LogitsProcessorList

        from specdec.bench.forcing import ForceReference

        if not params.greedy:
            raise InputError("the llamacpp methods run greedy decoding only")
        self.llm.reset()  # no prompt-prefix reuse between runs: every method prefills every prompt
        self.forwards = 0
        out: list[int] = []
        forcing = None if force is None else ForceReference(len(prompt_ids), force)
        processors = None if forcing is None else LogitsProcessorList([forcing])
        eos = set() if forcing is not None else self.eos
        first = None
        start = time.perf_counter()
        for token in self.llm.generate(
            prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True, logits_processor=processors
        ):
            out.append(token)
            first = time.perf_counter() - start if first is None else first
            if token in eos or len(out) >= params.max_new_tokens:
                break
        seconds = time.perf_counter() - start
        # the prefill yields the first token, as a tree forward does
        return Run(out, seconds, self.forwards, first if forcing is not None else None)
