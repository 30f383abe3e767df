"""The public Python API: `SpecDecoder` wraps a model the user already has (or loads one by name)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields

import specdec.checks as checks
from specdec.drafters import Drafter, make_drafter
from specdec.engine import Engine, Generation, Stats, Step
from specdec.errors import ContextLengthError, InputError
from specdec.sampling import SamplingParams
from specdec.text import check_text, max_token_chars

_PARAM_NAMES = {f.name for f in fields(SamplingParams)}


def sampling_params(**kwargs) -> SamplingParams:
    unknown = sorted(set(kwargs) - _PARAM_NAMES)
    if unknown:
        raise InputError(f"unknown generation parameter(s): {', '.join(unknown)}")
    params = SamplingParams(**{k: v for k, v in kwargs.items() if v is not None})
    if isinstance(params.stop, str):
        params.stop = [params.stop]
    params.validate()  # every field's type and range: InputError, never a TypeError later in the engine
    return params


def default_method(has_draft: bool) -> str:
    """The method used when none is named (API, CLI, server): `auto`, which picks its members and tree size
    every step from measurements and decodes plainly when no tree pays; a given draft model is one of its
    members (`has_draft` no longer changes the method, and stays for the callers that pass it)."""
    return "auto"


def encode_prompt(model, tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a text prompt, or a list of token ids checked against the model's vocabulary (an id
    outside it would fail deep in the embedding lookup instead of as the caller's InputError)."""
    if isinstance(prompt, str):
        return encode_text(model, tokenizer, prompt)
    if hasattr(prompt, "tolist"):  # a 1-D tensor or array of ids
        prompt = prompt.tolist()
    if not isinstance(prompt, list | tuple):
        raise InputError(f"the prompt must be a string or a list of token ids (got {type(prompt).__name__})")
    vocab = model.config.get_text_config(decoder=True).vocab_size
    for t in prompt:
        if not checks.is_integer(t, integral=True):
            raise InputError(f"prompt token ids must be integers (got {t!r})")
        if not 0 <= t < vocab:
            raise InputError(f"prompt token id {t} is outside the model's vocabulary [0, {vocab})")
    return [int(t) for t in prompt]


def encode_text(model, tokenizer, text: str, what: str = "the prompt", **kwargs) -> list[int]:
    """Token ids of `text` (`kwargs` go to the tokenizer). A text that cannot fit in the model's context
    whatever its tokens (more characters than the context times the most one token stands for) is refused
    before tokenizing: a huge line cost seconds and gigabytes to tokenize only to be refused then (README)."""
    limit = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    per_token = max_token_chars(tokenizer) if limit else None
    if limit and per_token:
        at_least = -(-len(text) // per_token)
        if at_least >= limit:  # with at least one new token, over the context
            raise ContextLengthError(
                f"{what} ({len(text)} characters, so at least {at_least} tokens) exceeds the model's context "
                f"of {limit} positions"
            )
    check_text(text, what)
    # verbose=False: transformers' "Token indices sequence length is longer than..." warning would precede
    # the one-line error of the engine's own length check
    return tokenizer(text, verbose=False, **kwargs)["input_ids"]


class Stream:
    """Iterate for text deltas; `result` holds the full Generation once the iteration is over."""

    def __init__(self, steps: Iterator[Step]) -> None:
        self._steps = steps
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        for step in self._steps:
            if step.text:
                yield step.text
            if step.result is not None:
                self.result = step.result


class SpecDecoder:
    """Lossless speculative decoding for one causal LM.

    >>> dec = SpecDecoder(model, tokenizer)                          # method "auto"; or method="pld", ...
    >>> out = dec.generate("def fibonacci(n):", max_new_tokens=64)  # greedy: exactly model.generate()'s tokens
    >>> out.text, out.token_ids, out.stats.mean_accepted_tokens
    """

    def __init__(
        self,
        model,
        tokenizer,
        method: str | Drafter | None = None,
        draft_model=None,
        runtime: str = "auto",
        **options,
    ) -> None:
        """`runtime`: "auto" (the native forward where it supports and reproduces the model, else
        transformers'), "native" or "transformers" (see `specdec.runtime`)."""
        if tokenizer is None:
            raise InputError("a tokenizer is required (the model directory has none)")
        if draft_model is not None:
            from specdec.models.loading import check_same_vocabulary

            check_same_vocabulary(model, tokenizer, draft_model, None)
        if method is None:
            method = default_method(draft_model is not None)
        drafter = method if isinstance(method, Drafter) else make_drafter(method, draft_model, **options)
        self.model, self.tokenizer, self.drafter = model, tokenizer, drafter
        self.engine = Engine(model, tokenizer, drafter, runtime)

    @classmethod
    def from_pretrained(
        cls,
        model: str = "default",
        draft: str | None = None,
        method: str | None = None,
        dtype: str = "auto",
        runtime: str = "auto",
        layer_ids_from: str | None = None,
        quantize: str | None = None,
        **options,
    ) -> SpecDecoder:
        """Load by path or hub name ("default" = the shipped code model; draft "default" = its shipped draft).
        `layer_ids_from` ("vllm" | "sglang"): whose numbering an EAGLE-3 `draft` head's layer ids are in, where
        its files do not say (`specdec.heads.layer_ids`). `model` may be a GGUF file (llama.cpp's forward of
        it is the target); `quantize` ("q8_0", "q4_k_m") makes the target the model's GGUF file quantized so
        (`specdec.models.loading.load_models`)."""
        from specdec.drafters import REGISTRY, methods
        from specdec.models.loading import draft_roles, load_models, require_draft

        if method is not None and method not in REGISTRY:
            raise InputError(f"unknown method {method!r} (choose from {', '.join(methods())})")
        wants_model, wants_head = draft_roles([method] if method else [])
        loaded = load_models(model, draft, wants_model, dtype, draft_is_head=wants_head, quantize=quantize)
        method = method or default_method(loaded.draft is not None)
        require_draft([method], loaded.draft)
        if layer_ids_from is not None:  # read here, so that any method (auto's eagle member too) gets it so
            options["head"] = _eagle_head(loaded.head, loaded.target, layer_ids_from)
        elif loaded.head is not None:
            options.setdefault("head", loaded.head)
        return cls(loaded.target, loaded.tokenizer, method, loaded.draft, runtime, **options)

    def encode(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.model, self.tokenizer, prompt)

    def stream(self, prompt: str | list[int], **params) -> Stream:
        """Text deltas as they are accepted; never half a multi-byte character."""
        return Stream(self.engine.run(self.encode(prompt), sampling_params(**params)))

    def generate_batch(self, prompts: list, **params) -> list[Generation]:
        """Decode the prompts together (one target forward per step scores every row's tree; see
        `specdec.batch`): each result is what `generate(prompt, **params)` gives for that prompt alone (a
        seed seeds every row's own generator). Needs the native runtime and a drafter that reads no hidden
        states."""
        from specdec.batch import run_batch

        if not isinstance(prompts, list | tuple) or not prompts:
            raise InputError("prompts must be a non-empty list of prompts")
        ids = [self.encode(p) for p in prompts]
        params_list = [sampling_params(**params) for _ in ids]
        results: list[Generation | None] = [None] * len(ids)
        for i, step in run_batch(self.engine, ids, params_list):
            if step.result is not None:
                results[i] = step.result
        assert all(r is not None for r in results)  # every row runs until its last step
        return [r for r in results if r is not None]

    def generate(self, prompt: str | list[int], **params) -> Generation:
        """Params: max_new_tokens, temperature, top_k, top_p, seed, stop, ignore_eos (see SamplingParams)."""
        stream = self.stream(prompt, **params)
        for _ in stream:
            pass
        assert stream.result is not None  # the engine's last step always carries the result
        return stream.result


def _eagle_head(head_dir: str | None, target, layer_ids_from: str):
    """The EAGLE-3 head at `head_dir`, its layer ids read as `layer_ids_from` says, in the target's dtype."""
    from pathlib import Path

    from specdec.heads.checkpoint import read_config
    from specdec.heads.eagle3 import ARCHITECTURES, load_head

    archs = (read_config(Path(head_dir)).get("architectures") or []) if head_dir is not None else []
    if head_dir is None or not set(archs) & set(ARCHITECTURES):
        raise InputError("--layer-ids-from is for an EAGLE-3 head given as --draft HEAD_DIR")
    return load_head(head_dir, target, next(target.parameters()).dtype, layer_ids_from)


__all__ = ["SpecDecoder", "Generation", "Stats", "Step", "SamplingParams", "Stream"]
