"""The timing harness: every method on every prompt, interleaved, in one process, with the lossless check.

Per prompt the methods run back to back (A B C A B C ...), so slow drifts of the machine (other load, thermal
state) hit every method alike. The baseline is transformers' own `generate()` on the same model object, with
the same dtype, threads, prompt ids and max_new_tokens (for a GGUF target: llama.cpp's own loop over the file,
`methods.baseline`). Under greedy decoding every method's token ids must equal the baseline's; the first
difference is diagnosed with a fresh target forward over the reference prefix.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypedDict

import torch

from specdec.bench.methods import (
    GGUF_BASELINE,
    HF_METHODS,
    HF_PROMPT_LOOKUP_TOKENS,
    RUNTIME_SUFFIXES,
    ForwardCounter,
    HFMethod,
    Method,
    Run,
    SpecdecMethod,
    baseline,
    split_runtime,
)
from specdec.bench.tasks import BenchPrompt
from specdec.errors import InputError
from specdec.models.gguf_target import GGUFTarget
from specdec.sampling import SamplingParams

TIE_GAP = 1e-4  # a top-2 logit gap below this (fp32) is a numerical tie: rounding may pick either token
# the same for a GGUF target: llama.cpp's batched products (a tree, a prompt) and its one-row ones (its plain
# loop's steps) take different kernels, and in a quantized file they quantize the activations differently, so
# their logits differ by far more than float32 rounding: in one bench of the shipped target's files, top-2
# gaps up to 0.006 flipped in Q8_0 and up to 0.023 in Q4_K_M, llama.cpp's own prompt lookup among them
# (0.011: its batched verify against its plain loop)
GGUF_TIE_GAP = 5e-2


def tie_gap(model) -> float:
    return GGUF_TIE_GAP if isinstance(model, GGUFTarget) else TIE_GAP


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


def gguf_methods() -> list[str]:
    """The bench's methods for a GGUF target: llama.cpp's own two and the specdec methods that can run on the
    file (`Drafter.gguf_needs`; `draft` with a draft model, medusa and hydra where heads fit the model: a
    method whose heads do not is skipped with the reason)."""
    from specdec.bench.llamacpp import LLAMACPP_METHODS
    from specdec.drafters import REGISTRY, methods

    return [*LLAMACPP_METHODS, *(m for m in methods() if not REGISTRY[m].gguf_needs())]


def select_methods(requested: list[str] | None, has_draft: bool, model=None) -> list[str]:
    """The baseline first (always: `methods.baseline`), then the requested or all applicable methods."""
    base = baseline(model)
    known = all_methods() if base != GGUF_BASELINE else gguf_methods()
    if base == GGUF_BASELINE and requested is not None and any(m in HF_METHODS for m in requested):
        raise InputError(
            "the hf-* methods run transformers' generate(): a GGUF target has no transformers model"
        )
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
    return [base, *[m for m in chosen if m != base]]


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
    first_seconds: float | None = None  # to the first new token (forced runs: `--scale`)
    draft_seconds: float | None = None  # specdec's split of `seconds` (its methods only)
    verify_seconds: float | None = None
    other_seconds: float | None = None
    draft_nodes: int | None = None  # drafted nodes the target scored, over all steps

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
    numerical_tie: bool  # gap < the tie gap (`tie_gap`) and both tokens are the top two

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
        self.tie_gap = tie_gap(model)  # a top-2 gap below it is a numerical tie
        self._wide = None

    def top2(self, ids: list[int]) -> tuple[int, int, float]:
        model = self.model
        if isinstance(model, GGUFTarget):  # the file's own forward, as the baseline (llama.cpp's loop) ran it
            from specdec.runtime.llamacpp import LlamaCppRunner

            runner = LlamaCppRunner(model.shared)
            logits = runner.start(ids, len(ids) + 1)
            runner.free()
            values, tokens = logits.float().topk(2)
            return int(tokens[0]), int(tokens[1]), float(values[0] - values[1])
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
    tie = (
        gap < diagnoser.tie_gap
        and expected is not None
        and token is not None
        and {expected, token} == {top1, top2}
    )
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
    references: list[list[int]] | None = None,
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

    `references` (greedy, plain prompts): every method decodes exactly references[i] after prompt i, its
    verdicts forced along it (`specdec.bench.forcing`), and the warm-up is forced along the prompts' own text.
    """
    assert methods and methods[0].name == baseline(model)
    config = model.config.get_text_config(decoder=True)
    limit = getattr(config, "max_position_embeddings", None)
    static_ids = [None if p.text is None else p.render(tokenizer, []) for p in prompts]
    check_lengths(prompts, static_ids, params, limit)
    warm: list[list[int]] | list[tuple[list[int], list[int]]] = warm_prompts(prompts, static_ids, tokenizer)
    if references is not None:
        assert params.greedy and all(ids is not None for ids in static_ids)
        warm = forced_warm_prompts(prompts, static_ids, references)
    share = repeats * len(prompts) + warmup  # a skipped method's runs on the progress bar
    methods, skipped = warm_up(methods, warm, warm_params(params), warmup, optional, progress, share)
    bench = Session(methods, tokenizer, Diagnoser(model), params.greedy, progress)
    counts: dict[str, int] = {}
    for i, prompt in enumerate(prompts):
        index = counts[prompt.task] = counts.get(prompt.task, -1) + 1
        ids = static_ids[i]
        if ids is None:  # a later chat turn: rendered after the answers before it
            ids = render_turn(prompts, i, bench.answers, tokenizer)
            check_lengths([prompt], [ids], params, limit)
        where: Where = {"prompt": i, "task": prompt.task, "index": index, "source": prompt.source}
        turn_params = prompt_params(params, prompt, i)
        force = None if references is None else references[i]
        if force is not None:
            turn_params.max_new_tokens = len(force)
        bench.records.extend(bench.rounds(Turn(where, ids, force=force), turn_params, repeats))
    return BenchResult(bench.records, bench.mismatches, methods, skipped)


def warm_prompts(
    prompts: list[BenchPrompt], static_ids: list[list[int] | None], tokenizer
) -> list[list[int]]:
    """The first prompt of every task (its first 256 tokens), for the warm-up: each generation there is long
    enough for the one-time costs to land in it and not in whichever method runs first on a new shape:
    first-call allocations and kernel selection for new sizes (docs/bench.md: what the first method on a new
    shape paid), the cost-model measurement, and auto's first generation at this
    temperature, which it spends on its default runtime learning what pays (docs/methods.md, auto)."""
    firsts: dict[str, list[int]] = {}
    for prompt, ids in zip(prompts, static_ids, strict=True):
        if ids:
            firsts.setdefault(prompt.task, ids[:256])
    return list(firsts.values()) or [tokenizer("def f(x):\n")["input_ids"]]


WARM_FORCED = 32  # tokens of a forced warm-up generation


def forced_warm_prompts(
    prompts: list[BenchPrompt], static_ids: list, references: list[list[int]]
) -> list[tuple[list[int], list[int]]]:
    """(prompt, reference) per task for a forced warm-up: the first prompt's first tokens (at most 256) and
    the next WARM_FORCED of its own text (its reference when the prompt is shorter). Forced, so that auto's
    first estimates come from real text and not from what a random-weight model writes."""
    firsts: dict[str, tuple[list[int], list[int]]] = {}
    for prompt, ids, ref in zip(prompts, static_ids, references, strict=True):
        if prompt.task in firsts:
            continue
        if len(ids) > 2 * WARM_FORCED:
            cut = min(256, len(ids) - WARM_FORCED)
            firsts[prompt.task] = (ids[:cut], ids[cut : cut + WARM_FORCED])
        else:
            firsts[prompt.task] = (ids, ref[:WARM_FORCED])
    return list(firsts.values())


def warm_params(params: SamplingParams) -> SamplingParams:
    """The bench's sampling settings, with at most 64 new tokens."""
    return SamplingParams(
        max_new_tokens=min(64, params.max_new_tokens),
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
    )


def warm_up(
    methods: list[Method],
    prompts: list[list[int]] | list[tuple[list[int], list[int]]],
    params: SamplingParams,
    rounds: int,
    optional: frozenset[str],
    progress: Callable[..., None],
    share: int,
) -> tuple[list[Method], dict[str, str]]:
    """`rounds` runs of every method over the warm-up prompts. Returns the methods left and, per method
    dropped, why: one in `optional` that raised InputError (its `share` of the progress bar is passed on).
    A prompt given as (ids, reference) is decoded forced along the reference."""
    skipped: dict[str, str] = {}
    for _ in range(rounds):
        for method in list(methods):
            try:
                for item in prompts:
                    if isinstance(item, tuple):
                        ids, force = item
                        forced = copy.copy(params)
                        forced.max_new_tokens = len(force)
                        method.run(ids, forced, force)
                    else:
                        method.run(item, params)
            except InputError as e:
                if method.name not in optional or method is methods[0]:
                    raise
                skipped[method.name] = str(e)
                methods = [m for m in methods if m is not method]
                progress(f"skipped {method.name}", share)
                continue
            progress(f"warm-up {method.name}")
    return methods, skipped


def render_turn(prompts: list[BenchPrompt], i: int, answers: list[str], tokenizer) -> list[int]:
    """Prompt i, a later chat turn, rendered after hf-vanilla's answers to the turns before it."""
    chain, j = [], prompts[i].previous
    while j is not None:
        chain.append(answers[j])
        j = prompts[j].previous
    return prompts[i].render(tokenizer, chain[::-1])


def prompt_params(params: SamplingParams, prompt: BenchPrompt, i: int) -> SamplingParams:
    """Prompt i's settings: its own max_new_tokens if it has one, and under sampling seed params.seed + i."""
    p = copy.copy(params)
    p.max_new_tokens = prompt.max_new_tokens or params.max_new_tokens
    if not params.greedy and params.seed is not None:
        p.seed = params.seed + i
    return p


def rotation(methods: list[Method], turn: int) -> list[Method]:
    """hf-vanilla first (its tokens are the reference), the others in an order rotated by `turn` (the prompt
    and round): a method right after the baseline ran slower by a few percent (caches and threads still busy
    with its work), so no method should always take that place."""
    others = methods[1:]
    shift = turn % len(others) if others else 0
    return methods[:1] + others[shift:] + others[:shift]


@dataclass
class Turn:
    """One prompt's runs so far."""

    where: Where
    ids: list[int]  # the prompt's token ids
    reference: list[int] | None = None  # hf-vanilla's tokens in the first round
    best: dict[str, Record] = field(default_factory=dict)  # per method: its fastest round
    mismatched: set[str] = field(default_factory=set)  # methods whose output differed in some round
    force: list[int] | None = None  # the tokens every method's verdicts are forced along (`--scale`)


@dataclass
class Session:
    """What the bench's prompts share: the methods (baseline first), hf-vanilla's decoded answer to each prompt
    so far (for later chat turns), and the records and mismatches so far."""

    methods: list[Method]
    tokenizer: Any
    diagnoser: Diagnoser
    greedy: bool
    progress: Callable[..., None]
    answers: list[str] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    mismatches: list[Mismatch] = field(default_factory=list)

    def rounds(self, turn: Turn, params: SamplingParams, repeats: int) -> list[Record]:
        """`repeats` rounds of every method on the prompt, each from the methods' state before it; per method
        the record of its fastest round."""
        methods = self.methods
        # each method's cross-request state before this prompt: every round starts from it
        snapshots = [m.snapshot() for m in methods] if repeats > 1 else []
        for round_ in range(repeats):
            if round_:
                for method, snapshot in zip(methods, snapshots, strict=True):
                    if snapshot is not None:
                        method.restore(snapshot)
            for method in rotation(methods, turn.where["prompt"] + round_):
                self.take(turn, method, method.run(turn.ids, params, turn.force))
                self.progress(f"{turn.where['task']} {turn.where['index']} {method.name}")
        return [turn.best[m.name] for m in methods]

    def take(self, turn: Turn, method: Method, run: Run) -> None:
        """Check a run against the reference (hf-vanilla's first run is it) and keep the method's fastest."""
        if turn.reference is None:  # forced: every method, hf-vanilla too, must emit the forced tokens
            turn.reference = run.token_ids if turn.force is None else turn.force
            self.answers.append(self.tokenizer.decode(turn.reference, skip_special_tokens=True))
        if self.greedy:
            self.compare(turn, method.name, run.token_ids)
        record = Record(
            **turn.where,
            method=method.name,
            prompt_tokens=len(turn.ids),
            new_tokens=len(run.token_ids),
            seconds=run.seconds,
            target_forwards=run.target_forwards,
            match=None,
            first_seconds=run.first_seconds,
        )
        if run.stats is not None:
            record.draft_seconds = run.stats.draft_seconds
            record.verify_seconds = run.stats.verify_seconds
            record.other_seconds = run.stats.other_seconds
            record.draft_nodes = run.stats.draft_nodes
        kept = turn.best.get(method.name)
        if kept is None or _rate(record) < _rate(kept):
            turn.best[method.name] = record
        if self.greedy:  # a mismatch in any round marks the method's record on this prompt
            turn.best[method.name].match = method.name not in turn.mismatched

    def compare(self, turn: Turn, method: str, tokens: list[int]) -> None:
        """Greedy: diagnose the method's first difference from the reference (one report per prompt)."""
        assert turn.reference is not None
        position = first_difference(turn.reference, tokens)
        if position is not None and method not in turn.mismatched:
            turn.mismatched.add(method)
            where = {**turn.where, "method": method}
            self.mismatches.append(
                diagnose(self.diagnoser, turn.ids, turn.reference, tokens, position, where)
            )


def _rate(record: Record) -> float:
    """Seconds per new token (what `repeats` minimises)."""
    return record.seconds / max(1, record.new_tokens)


def run_methods(args, prompts, model, tokenizer, draft_model, params, names, references=None):
    """Build the methods `names` and run them under one progress bar (forced along `references`, when
    given: `run_bench`); returns (result, skipped methods), each skipped one said on stderr."""
    import sys

    from tqdm import tqdm

    explicit = args.methods is not None
    counter = ForwardCounter(model)
    try:
        methods, skipped = build_methods(
            names, model, tokenizer, draft_model, counter, explicit, args.runtime
        )
        for name, reason in skipped.items():
            print(f"specdec bench: skipping {name}: {reason}", file=sys.stderr)
        total = len(methods) * (args.warmup + args.repeats * len(prompts))
        bar = tqdm(total=total, desc="bench", unit="run", file=sys.stderr, disable=None, dynamic_ncols=True)
        with bar:

            def progress(desc: str, runs: int = 1) -> None:
                bar.set_postfix_str(desc, refresh=False)
                bar.update(runs)

            optional = frozenset() if explicit else frozenset(m.name for m in methods)
            result = run_bench(
                prompts,
                methods,
                model,
                tokenizer,
                params,
                progress,
                args.warmup,
                optional,
                args.repeats,
                references,
            )
    finally:
        counter.close()
    for name, reason in result.skipped.items():
        print(f"specdec bench: skipped {name} after its warm-up failed: {reason}", file=sys.stderr)
    return result, {**skipped, **result.skipped}
