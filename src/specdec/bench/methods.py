"""The methods the bench times: transformers' own `generate()` (plain, prompt lookup, assisted) and specdec's
drafters in its engine, behind one interface (`Method`), with what a run returns (`Run`) and how the target's
forwards are counted. llama.cpp's methods (`specdec.bench.llamacpp`) implement the same interface."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from specdec.sampling import SamplingParams

HF_METHODS = ("hf-vanilla", "hf-prompt-lookup", "hf-assisted")
BASELINE = "hf-vanilla"
HF_PROMPT_LOOKUP_TOKENS = 10
GGUF_BASELINE = "llamacpp"  # llama.cpp's own loop over the file (`specdec.bench.llamacpp`)


def baseline(model) -> str:
    """The method every other is timed and checked against: transformers' greedy generate(), or, for a GGUF
    target, llama.cpp's own plain loop over the file (what its users would otherwise run; lossless there means
    equal to it)."""
    from specdec.models.gguf_target import GGUFTarget

    return GGUF_BASELINE if isinstance(model, GGUFTarget) else BASELINE


@dataclass
class Run:
    token_ids: list[int]
    seconds: float
    target_forwards: int
    first_seconds: float | None = None  # to the first new token (measured for forced runs)
    stats: Any = None  # specdec's `Stats` of the generation (its methods only)


class ForwardCounter:
    """Counts calls of the target model's forward (a pre-hook: generate() calls the module, not .forward)."""

    def __init__(self, model) -> None:
        self.count = 0
        hook = getattr(model, "register_forward_pre_hook", None)  # none on a GGUF target: nothing to count
        self._handle = hook(self._hook) if hook is not None else None

    def _hook(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class Method:
    name: str
    family: str  # "transformers" or "specdec"

    def run(self, prompt_ids: list[int], params: SamplingParams, force: list[int] | None = None) -> Run:
        """One generation; `force`: greedy, decoding exactly these tokens (`specdec.bench.forcing`)."""
        raise NotImplementedError

    def snapshot(self) -> object:
        """What the method learned across requests so far (None: it learns nothing), for `restore`."""
        return None

    def restore(self, snapshot: object) -> None:
        """Back to the state `snapshot` saw (the bench's later rounds of a prompt start where the first did)."""


class HFMethod(Method):
    """transformers' generate(); `extra` selects prompt lookup or assisted generation."""

    family = "transformers"

    def __init__(self, name: str, model, counter: ForwardCounter, **extra) -> None:
        self.name, self.model, self.counter, self.extra = name, model, counter, extra
        config = model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        self.pad = pad[0] if isinstance(pad, list) else pad

    def run(self, prompt_ids: list[int], params: SamplingParams, force: list[int] | None = None) -> Run:
        from specdec.bench.forcing import ForceReference

        ids = torch.tensor([prompt_ids])
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.pad, **self.extra}
        forcing = None
        if force is not None:
            assert params.greedy and params.max_new_tokens == len(force)
            forcing = ForceReference(len(prompt_ids), force)
            kwargs.update(do_sample=False, logits_processor=[forcing])
        elif params.greedy:
            kwargs["do_sample"] = False
        else:  # top_k explicitly: generate() would otherwise apply its default top_k=50
            kwargs.update(
                do_sample=True, temperature=params.temperature, top_k=params.top_k, top_p=params.top_p
            )
            if params.seed is not None:
                torch.manual_seed(params.seed)  # generate() samples from the global RNG
        before = self.counter.count
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        seconds = time.perf_counter() - start
        first = None if forcing is None or forcing.first_call is None else forcing.first_call - start
        return Run(out[0, len(prompt_ids) :].tolist(), seconds, self.counter.count - before, first)


class SpecdecMethod(Method):
    """A registered specdec drafter in the engine; the decoder (and any state a drafter keeps across
    generations, such as a learned table) lives for the whole bench, as it would in a server."""

    family = "specdec"

    def __init__(self, name: str, model, tokenizer, draft_model=None, runtime: str = "auto") -> None:
        from specdec.api import SpecDecoder

        self.name = name
        method, forced = split_runtime(name)
        self.decoder = SpecDecoder(
            model, tokenizer, method=method, draft_model=draft_model, runtime=forced or runtime
        )
        # auto may run a request on either of two runtimes (docs/runtime.md)
        self.runtime = " or ".join(r.name for r in self.decoder.engine.runtimes)

    def snapshot(self) -> object:
        """What the drafter learned across requests (suffix's index of earlier requests, recycle's table,
        auto's estimates...): a later round of the same prompt must not find its own earlier answer there."""
        return self.decoder.engine.drafter.snapshot_learned()

    def restore(self, snapshot: object) -> None:
        assert isinstance(snapshot, dict)  # made by `snapshot`
        self.decoder.engine.drafter.restore_learned(snapshot)

    def run(self, prompt_ids: list[int], params: SamplingParams, force: list[int] | None = None) -> Run:
        if force is not None:
            from specdec.bench.forcing import forced_generation

            forced = forced_generation(self.decoder.engine, prompt_ids, force)
            stats = forced.generation.stats
            tokens = forced.generation.token_ids
            return Run(tokens, forced.seconds, stats.target_forwards, forced.first_seconds, stats)
        start = time.perf_counter()
        result = self.decoder.generate(
            prompt_ids,
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            seed=params.seed,
        )
        seconds = time.perf_counter() - start
        return Run(result.token_ids, seconds, result.stats.target_forwards, stats=result.stats)


# `pld@transformers`: pld on that runtime, whatever --runtime says
RUNTIME_SUFFIXES = ("llamacpp", "native", "transformers")


def split_runtime(name: str) -> tuple[str, str | None]:
    """'pld@transformers' -> ('pld', 'transformers'); 'pld' -> ('pld', None)."""
    method, _, runtime = name.partition("@")
    return method, runtime or None
