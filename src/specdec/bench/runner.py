"""The timing harness: every method on every prompt, interleaved, in one process, with the lossless check.

Per prompt the methods run back to back (A B C A B C ...), so slow drifts of the machine (other load, thermal
state) hit every method alike. The baseline is transformers' own `generate()` on the same model object, with
the same dtype, threads, prompt ids and max_new_tokens. Under greedy decoding every method's token ids must
equal hf-vanilla's; the first difference is diagnosed with a fresh target forward over the reference prefix.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TypedDict

import torch

from specdec.bench.tasks import BenchPrompt
from specdec.drafters.base import Drafter
from specdec.errors import InputError
from specdec.sampling import SamplingParams

HF_METHODS = ("hf-vanilla", "hf-prompt-lookup", "hf-assisted")
BASELINE = "hf-vanilla"
TIE_GAP = 1e-4  # a top-2 logit gap below this (fp32) is a numerical tie: rounding may pick either token
HF_PROMPT_LOOKUP_TOKENS = 10


@dataclass
class Run:
    token_ids: list[int]
    seconds: float
    target_forwards: int


class ForwardCounter:
    """Counts calls of the target model's forward (a pre-hook: generate() calls the module, not .forward)."""

    def __init__(self, model) -> None:
        self.count = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.count += 1

    def close(self) -> None:
        self._handle.remove()


class Method:
    name: str
    family: str  # "transformers" or "specdec"

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
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

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
        ids = torch.tensor([prompt_ids])
        kwargs = {"max_new_tokens": params.max_new_tokens, "pad_token_id": self.pad, **self.extra}
        if params.greedy:
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
        return Run(out[0, len(prompt_ids) :].tolist(), seconds, self.counter.count - before)


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
        """A copy of the drafter (suffix's index of earlier requests, recycle's table, auto's estimates...):
        a later round of the same prompt must not find its own earlier answer there. Models and heads are
        shared, not copied: decoding never changes them."""
        drafter = self.decoder.engine.drafter
        return copy.deepcopy(drafter, _modules_of(drafter))

    def restore(self, snapshot: object) -> None:
        drafter = copy.deepcopy(snapshot, _modules_of(snapshot))  # a copy again: the next round needs it too
        assert isinstance(drafter, Drafter)
        self.decoder.engine.drafter = drafter

    def run(self, prompt_ids: list[int], params: SamplingParams) -> Run:
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
        return Run(result.token_ids, seconds, result.stats.target_forwards)


def _modules_of(root: object) -> dict[int, object]:
    """A deepcopy memo mapping every torch module reachable from `root` to itself (so copies share them), and
    every packed weight (`specdec.runtime.native.Matrix`: read-only; its oneDNN tensor is opaque to deepcopy)."""
    from specdec.runtime.native import Matrix

    memo: dict[int, object] = {}
    seen: set[int] = set()
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (torch.nn.Module, Matrix)) or (isinstance(obj, torch.Tensor) and obj.is_mkldnn):
            memo[id(obj)] = obj
            continue
        if isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack.extend(vars(obj).values())
    return memo


# `pld@transformers`: pld on that runtime, whatever --runtime says
RUNTIME_SUFFIXES = ("llamacpp", "native", "transformers")


def split_runtime(name: str) -> tuple[str, str | None]:
    """'pld@transformers' -> ('pld', 'transformers'); 'pld' -> ('pld', None)."""
    method, _, runtime = name.partition("@")
    return method, runtime or None


def needs_draft(name: str) -> bool:
    from specdec.drafters import REGISTRY

    name = split_runtime(name)[0]
    return name == "hf-assisted" or (name in REGISTRY and REGISTRY[name].needs_draft_model)


def llamacpp_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf"))


def all_methods() -> list[str]:
    """Every method name the bench knows (llama.cpp's two only when its extra is installed)."""
    from specdec.bench.llamacpp import LLAMACPP_METHODS
    from specdec.drafters import methods

    return [*HF_METHODS, *methods(), *(LLAMACPP_METHODS if llamacpp_available() else ())]


def select_methods(requested: list[str] | None, has_draft: bool) -> list[str]:
    """hf-vanilla first (always: it is the baseline), then the requested or all applicable methods."""
    known = all_methods()
    if requested is None:
        chosen = [m for m in known if has_draft or not needs_draft(m)]
    else:
        from specdec.bench.llamacpp import LLAMACPP_METHODS, require_llamacpp

        if any(m in LLAMACPP_METHODS for m in requested):
            require_llamacpp()  # the install hint, rather than "unknown method"
        unknown = [m for m in requested if not _known(m, known)]
        if unknown:
            raise InputError(
                f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(known)}; a specdec method may "
                f"name its runtime: NAME@{'|'.join(RUNTIME_SUFFIXES)})"
            )
        missing = [m for m in requested if needs_draft(m)] if not has_draft else []
        if missing:
            raise InputError(f"{', '.join(missing)} need(s) a draft model (--draft PATH, or --draft default)")
        chosen = list(dict.fromkeys(requested))
    return [BASELINE, *[m for m in chosen if m != BASELINE]]


def _known(name: str, known: list[str]) -> bool:
    from specdec.bench.llamacpp import LLAMACPP_METHODS

    method, runtime = split_runtime(name)
    if runtime is None:
        return method in known
    specdec_method = method not in HF_METHODS and method not in LLAMACPP_METHODS
    return method in known and specdec_method and runtime in RUNTIME_SUFFIXES


def build_methods(
    names: list[str],
    model,
    tokenizer,
    draft_model,
    counter: ForwardCounter,
    explicit: bool,
    runtime: str = "auto",
) -> tuple[list[Method], dict[str, str]]:
    """Method objects; a specdec method that cannot be built for this model is skipped (with the reason)
    when it was picked by default, and an error when the user asked for it."""
    from specdec.bench.llamacpp import LLAMACPP_METHODS, LlamaCppMethod

    methods: list[Method] = []
    skipped: dict[str, str] = {}
    for name in names:
        if name == "hf-vanilla":
            methods.append(HFMethod(name, model, counter))
        elif name == "hf-prompt-lookup":
            methods.append(HFMethod(name, model, counter, prompt_lookup_num_tokens=HF_PROMPT_LOOKUP_TOKENS))
        elif name == "hf-assisted":
            methods.append(HFMethod(name, model, counter, assistant_model=draft_model))
        elif name in LLAMACPP_METHODS:
            try:
                methods.append(LlamaCppMethod(name, model, tokenizer, torch.get_num_threads()))
            except InputError as e:
                if explicit:
                    raise
                skipped[name] = str(e)
        else:
            try:
                methods.append(SpecdecMethod(name, model, tokenizer, draft_model, runtime))
            except InputError as e:
                if explicit:
                    raise
                skipped[name] = str(e)
    return methods, skipped


class Where(TypedDict):
    """Which prompt a record or mismatch is about (the fields `Record` and `Mismatch` start with)."""

    prompt: int
    task: str
    index: int
    source: str


@dataclass
class Record:
    """One method on one prompt."""

    prompt: int  # index into the bench's prompt list
    task: str
    index: int  # index within its task
    source: str
    method: str
    prompt_tokens: int
    new_tokens: int
    seconds: float
    target_forwards: int
    match: bool | None  # token ids equal hf-vanilla's (None when sampling)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Mismatch:
    prompt: int
    task: str
    index: int
    source: str
    method: str
    position: int  # first differing position among the generated tokens
    expected: int | None  # hf-vanilla's token there (None: it had stopped)
    got: int | None
    top1: int  # the target's two best tokens at that position (fresh forward over the reference prefix)
    top2: int
    gap: float  # top-1 minus top-2 logit, in float32 or wider
    numerical_tie: bool  # gap < TIE_GAP and both tokens are the top two

    def to_dict(self) -> dict:
        return asdict(self)


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


class Diagnoser:
    """Top-2 logit gap of the target after a given prefix, in float32 (a float32 copy for 16-bit models)."""

    def __init__(self, model) -> None:
        self.model = model
        self._wide = None

    def top2(self, ids: list[int]) -> tuple[int, int, float]:
        model = self.model
        if next(model.parameters()).dtype not in (torch.float32, torch.float64):
            if self._wide is None:
                self._wide = copy.deepcopy(model).float()
            model = self._wide
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        values, tokens = logits.topk(2)
        return int(tokens[0]), int(tokens[1]), float(values[0] - values[1])


def diagnose(
    diagnoser: Diagnoser,
    prompt_ids: list[int],
    reference: list[int],
    got: list[int],
    position: int,
    where: dict,
) -> Mismatch:
    top1, top2, gap = diagnoser.top2(prompt_ids + reference[:position])
    expected = reference[position] if position < len(reference) else None
    token = got[position] if position < len(got) else None
    tie = gap < TIE_GAP and expected is not None and token is not None and {expected, token} == {top1, top2}
    return Mismatch(
        **where,
        position=position,
        expected=expected,
        got=token,
        top1=top1,
        top2=top2,
        gap=gap,
        numerical_tie=tie,
    )


@dataclass
class BenchResult:
    records: list[Record]
    mismatches: list[Mismatch]
    methods: list[Method]  # those that ran, baseline first
    skipped: dict[str, str]  # optional methods that refused this model or these settings during warm-up


def check_lengths(
    prompts: list[BenchPrompt], ids: list[list[int] | None], params: SamplingParams, limit
) -> None:
    """Refuse before any timing when a prompt + its new tokens cannot fit the model's context."""
    if limit is None:
        return
    for i, (p, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
        n = p.max_new_tokens or params.max_new_tokens
        if prompt_ids is not None and len(prompt_ids) + n > limit:
            raise InputError(
                f"{p.task} prompt {i} ({p.source}): {len(prompt_ids)} prompt tokens + {n} new tokens exceed the "
                f"model's context of {limit} positions (lower --max-new-tokens)"
            )


def run_bench(
    prompts: list[BenchPrompt],
    methods: list[Method],
    model,
    tokenizer,
    params: SamplingParams,
    progress: Callable[..., None] = lambda desc, runs=1: None,
    warmup: int = 1,
    optional: frozenset[str] = frozenset(),
    repeats: int = 1,
) -> BenchResult:
    """Warm up every method, then run them interleaved per prompt (hf-vanilla first, the others in an order
    rotated from prompt to prompt). `progress(desc, runs=1)` follows the runs.

    `repeats` > 1 runs every prompt that many rounds (each round hf-vanilla first, the others rotated on) and
    keeps, per method, its fastest round (seconds per new token): interference from other work on the machine
    only ever slows a run, so the least is the least disturbed (as `CostModel.measure` and timeit take it).
    Every round starts from the methods' state before the prompt (`Method.snapshot`): a drafter that learns
    across requests must not draft a round from the answer it saw in the one before. Every round's output is
    checked against hf-vanilla's first.

    A method in `optional` (picked by default, not by the user) that raises InputError during warm-up (say, a
    drafter that cannot serve this model) is dropped with its reason instead of failing the whole bench.

    Under sampling, prompt i is generated with seed params.seed + i by every method.
    """
    assert methods and methods[0].name == BASELINE
    config = model.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    static_ids = [None if p.text is None else p.render(tokenizer, []) for p in prompts]
    check_lengths(prompts, static_ids, params, limit)

    # warm-up: the first prompt of every task (its first 256 tokens), each generation long enough for the
    # one-time costs to land there and not in whichever method runs first on a new shape: first-call
    # allocations and kernel selection for new sizes (the first method on the first short edit prompt paid
    # ~0.18 s more than the next one), the cost-model measurement, and auto's first generation at this
    # temperature, which it spends on its default runtime learning what pays (docs/methods.md, auto)
    firsts: dict[str, list[int]] = {}
    for prompt, ids in zip(prompts, static_ids, strict=True):
        if ids:
            firsts.setdefault(prompt.task, ids[:256])
    warm_prompts = list(firsts.values()) or [tokenizer("def f(x):\n")["input_ids"]]
    warm = SamplingParams(
        max_new_tokens=min(64, params.max_new_tokens),
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
    )
    skipped: dict[str, str] = {}
    for _ in range(warmup):
        for method in list(methods):
            try:
                for ids in warm_prompts:
                    method.run(ids, warm)
            except InputError as e:
                if method.name not in optional or method.name == BASELINE:
                    raise
                skipped[method.name] = str(e)
                methods = [m for m in methods if m is not method]
                progress(f"skipped {method.name}", repeats * len(prompts) + warmup)  # its share of the bar
                continue
            progress(f"warm-up {method.name}")

    greedy = params.greedy
    diagnoser = Diagnoser(model)
    answers: list[str] = []  # hf-vanilla's decoded answer to each prompt (for later chat turns)
    counts: dict[str, int] = {}
    records: list[Record] = []
    mismatches: list[Mismatch] = []
    for i, prompt in enumerate(prompts):
        index = counts[prompt.task] = counts.get(prompt.task, -1) + 1
        ids = static_ids[i]
        if ids is None:
            chain, j = [], prompt.previous
            while j is not None:
                chain.append(answers[j])
                j = prompts[j].previous
            ids = prompt.render(tokenizer, chain[::-1])
            check_lengths([prompt], [ids], params, limit)
        p = copy.copy(params)
        p.max_new_tokens = prompt.max_new_tokens or params.max_new_tokens
        if not greedy and params.seed is not None:
            p.seed = params.seed + i
        where: Where = {"prompt": i, "task": prompt.task, "index": index, "source": prompt.source}
        reference: list[int] | None = None
        best: dict[str, Record] = {}  # per method: its fastest round on this prompt
        mismatched: set[str] = set()  # methods whose output differed from the reference in some round
        others = methods[1:]
        # each method's cross-request state before this prompt: every round starts from it
        snapshots = [m.snapshot() for m in methods] if repeats > 1 else []
        for round_ in range(repeats):
            if round_:
                for method, snapshot in zip(methods, snapshots, strict=True):
                    if snapshot is not None:
                        method.restore(snapshot)
            # hf-vanilla first (its tokens are the reference), the others in an order rotated per prompt and
            # round: a method right after the baseline ran slower by a few percent (caches and threads still
            # busy with its work), so no method should always take that place
            shift = (i + round_) % len(others) if others else 0
            for method in methods[:1] + others[shift:] + others[:shift]:
                run = method.run(ids, p)
                if reference is None:  # hf-vanilla's first round
                    reference = run.token_ids
                    answers.append(tokenizer.decode(reference, skip_special_tokens=True))
                if greedy:
                    position = first_difference(reference, run.token_ids)
                    if position is not None and method.name not in mismatched:  # one report per prompt
                        mismatched.add(method.name)
                        mismatches.append(
                            diagnose(
                                diagnoser,
                                ids,
                                reference,
                                run.token_ids,
                                position,
                                {**where, "method": method.name},
                            )
                        )
                record = Record(
                    **where,
                    method=method.name,
                    prompt_tokens=len(ids),
                    new_tokens=len(run.token_ids),
                    seconds=run.seconds,
                    target_forwards=run.target_forwards,
                    match=None,
                )
                kept = best.get(method.name)
                if kept is None or _rate(record) < _rate(kept):
                    best[method.name] = record
                if greedy:  # a mismatch in any round marks the method's record on this prompt
                    best[method.name].match = method.name not in mismatched
                progress(f"{prompt.task} {index} {method.name}")
        records.extend(best[m.name] for m in methods)
    return BenchResult(records, mismatches, methods, skipped)


def _rate(record: Record) -> float:
    """Seconds per new token (what `repeats` minimises)."""
    return record.seconds / max(1, record.new_tokens)
