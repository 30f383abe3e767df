"""`specdec bench --tasks structured`: decoding under constraints, against transformers' constrained
`generate()` (the same grammar engine as a logits processor: the lossless reference) and against specdec's
own unconstrained `auto` on the same prompts.

Each prompt of the suite (bench/tasks/structured/suite.jsonl) carries its constraint: JSON extracted from
code and docstrings, function-call arguments, a config file (a small grammar), a regex-shaped identifier
list. Per method and kind: validity (the output is a whole sentence of its constraint: must be 100%), tau,
the tokens the grammar forced, the grammar's share of the wall time, the speedup over constrained
`generate()` (its seconds over the method's, summed over the same prompts) and the rate against unconstrained
`auto`'s (tokens per second, as the two write different text), and whether every greedy output equals
the reference's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from importlib import resources

import torch
from tqdm import tqdm

from specdec.errors import InputError
from specdec.grammar import Constraint, GrammarState
from specdec.sampling import SamplingParams

BASELINE = "hf-constrained"
UNCONSTRAINED = "auto-unconstrained"
LLAMACPP = "llamacpp-gbnf"  # llama.cpp's own grammar sampler, where the llamacpp extra is installed
METHODS = ("vanilla", "pld", "suffix", "recycle", "merge", "lookahead", "auto")


@dataclass(frozen=True)
class StructuredPrompt:
    kind: str
    source: str
    text: str
    constraint: Constraint
    max_new_tokens: int


def load() -> list[StructuredPrompt]:
    text = (resources.files("specdec.bench") / "tasks" / "structured" / "suite.jsonl").read_text("utf-8")
    out = []
    for line in text.splitlines():
        row = json.loads(line)
        spec = row["constraint"]
        value = spec["value"]
        constraint = (
            Constraint.json_schema(value)
            if spec["kind"] == "json_schema"
            else Constraint(spec["kind"], value)
        )
        out.append(
            StructuredPrompt(row["kind"], row["source"], row["prompt"], constraint, row["max_new_tokens"])
        )
    return out


@dataclass
class Outcome:
    """One method's run of one prompt."""

    tokens: list[int]
    seconds: float
    forwards: int
    valid: bool
    forced: int = 0
    grammar_seconds: float = 0.0


@dataclass
class Row:
    kind: str
    method: str
    prompts: int
    valid: float  # share of outputs that are whole sentences of their constraint
    tokens_per_second: float
    speedup: float | None  # over hf-constrained: its seconds / the method's, same prompts
    vs_unconstrained: float | None  # tok/s over unconstrained auto's
    tau: float
    forced_per_output: float
    grammar_share: float  # of the wall time
    lossless: bool | None  # every greedy output equals hf-constrained's (None: sampled, or the reference)
    mismatches: list[str] = field(default_factory=list)


def first_of_each(
    prompts: list[StructuredPrompt], n: int | None, max_new_tokens: int | None = None
) -> list[StructuredPrompt]:
    """The first `n` prompts of each kind (all of them for None), each with `max_new_tokens` when given
    (--max-new-tokens; else the suite's own, room for its output)."""
    seen: Counter[str] = Counter()
    out = []
    for p in prompts:
        seen[p.kind] += 1
        if not n or seen[p.kind] <= n:
            out.append(p if max_new_tokens is None else replace(p, max_new_tokens=max_new_tokens))
    return out


def valid(prompt: StructuredPrompt, tokenizer, vocab: int, eos: set[int], tokens: list[int]) -> bool:
    """The output is a whole sentence of the prompt's constraint (an EOS that ended it aside)."""
    state = GrammarState(prompt.constraint, tokenizer, vocab, eos)
    body = tokens[:-1] if tokens and tokens[-1] in eos else tokens
    try:
        state.advance(body)
    except RuntimeError:
        return False
    return state.complete


def _hf(model, tokenizer, eos: set[int], prompt: StructuredPrompt, ids: list[int], params: SamplingParams):
    from specdec.grammar.hf import ConstraintLogitsProcessor

    vocab = model.config.get_text_config(decoder=True).vocab_size
    processor = ConstraintLogitsProcessor(prompt.constraint, tokenizer, vocab, eos)
    pad = model.generation_config.pad_token_id
    pad = pad if pad is not None else min(eos) if eos else 0
    x = torch.tensor([ids])
    kwargs: dict = {"do_sample": False}
    if not params.greedy:
        kwargs = {
            "do_sample": True,
            "temperature": params.temperature,
            "top_k": params.top_k,
            "top_p": params.top_p,
        }
        torch.manual_seed(params.seed or 0)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=prompt.max_new_tokens, pad_token_id=pad,
            logits_processor=[processor], **kwargs,
        )  # fmt: skip
    seconds = time.perf_counter() - start
    tokens = out[0, len(ids) :].tolist()
    return Outcome(tokens, seconds, len(tokens), False, grammar_seconds=processor.state.seconds)


def timed_generate(decoder, prompt: StructuredPrompt, given, params: SamplingParams, constrained: bool):
    """(the decoder's generation of `given` (the prompt's ids or text) under the prompt's constraint, or
    without it; its seconds)."""
    start = time.perf_counter()
    result = decoder.generate(
        given,
        max_new_tokens=prompt.max_new_tokens,
        temperature=params.temperature,
        top_k=params.top_k,
        top_p=params.top_p,
        seed=params.seed,
        constraint=prompt.constraint if constrained else None,
    )
    return result, time.perf_counter() - start


def _specdec(decoder, prompt: StructuredPrompt, ids: list[int], params: SamplingParams, constrained: bool):
    result, seconds = timed_generate(decoder, prompt, ids, params, constrained)
    s = result.stats
    return Outcome(result.token_ids, seconds, s.target_forwards, False, s.forced_tokens, s.grammar_seconds)


class LlamaCppGrammar:
    """llama.cpp's own constrained decoding, greedy: its GBNF grammar sampler over the model's GGUF
    conversion. JSON Schemas go through llama-cpp-python's converter, GBNF grammars and choices as they are;
    a regex or a Lark grammar has no conversion, and that prompt is left out of the row. Its grammar engine is
    not llguidance, so its outputs are not compared with the reference (only checked for validity)."""

    def __init__(self, model, tokenizer, threads: int, eos: set[int]) -> None:
        from specdec.bench.llamacpp import LlamaCppMethod

        self.llm = LlamaCppMethod("llamacpp", model, tokenizer, threads).llm
        self.eos = eos

    @staticmethod
    def grammar(constraint: Constraint):
        from llama_cpp import LlamaGrammar

        if constraint.kind == "json_schema":
            return LlamaGrammar.from_json_schema(constraint.value, verbose=False)
        if constraint.kind == "json_object":
            return LlamaGrammar.from_json_schema('{"type": "object"}', verbose=False)
        if constraint.kind == "choice":
            return LlamaGrammar.from_string(
                "root ::= " + " | ".join(json.dumps(c) for c in constraint.value), verbose=False
            )
        if constraint.kind == "grammar" and constraint.syntax == "gbnf":
            return LlamaGrammar.from_string(constraint.value, verbose=False)
        return None

    def run(self, prompt: StructuredPrompt, ids: list[int]) -> Outcome | None:
        grammar = self.grammar(prompt.constraint)
        if grammar is None:
            return None
        self.llm.reset()
        out: list[int] = []
        start = time.perf_counter()
        for token in self.llm.generate(
            ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True, grammar=grammar
        ):
            out.append(token)
            if token in self.eos or len(out) >= prompt.max_new_tokens:
                break
        return Outcome(out, time.perf_counter() - start, len(out), False)


def run(args: argparse.Namespace, params: SamplingParams) -> int:
    from specdec.api import SpecDecoder
    from specdec.drafters import methods
    from specdec.engine import eos_token_ids
    from specdec.models.gguf_target import GGUFTarget
    from specdec.models.loading import freeze_heap, load_models, require_draft

    prompts = first_of_each(load(), args.prompts, args.max_new_tokens)
    names = list(args.methods or METHODS)
    unknown = [m for m in names if m not in methods()]
    if unknown:
        raise InputError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(methods())})")
    loaded = load_models(
        args.model, args.draft, "draft" in names, args.dtype or "auto", quantize=args.quantize
    )
    model, tokenizer = loaded.target, loaded.tokenizer
    require_draft(names, loaded.draft)
    if isinstance(model, GGUFTarget):
        raise InputError(
            "--tasks structured compares with transformers' constrained generate(): give a Hugging Face model"
        )
    freeze_heap()
    decoders = {
        name: SpecDecoder(model, tokenizer, name, draft_model=loaded.draft)
        for name in dict.fromkeys([*names, "auto"])
    }
    eos = eos_token_ids(model, tokenizer)
    vocab = model.config.get_text_config(decoder=True).vocab_size
    ids = [tokenizer(p.text)["input_ids"] for p in prompts]
    from specdec.runtime.gguf import gguf_reason, llamacpp_reason

    gbnf = None
    why = llamacpp_reason() or gguf_reason(model) or ("" if params.greedy else "greedy decoding only")
    if why:
        print(f"specdec bench: {LLAMACPP} left out: {why}", file=sys.stderr)
    else:
        gbnf = LlamaCppGrammar(model, tokenizer, torch.get_num_threads(), eos)
    extra = [LLAMACPP] if gbnf is not None else []
    runs: dict[str, list[Outcome | None]] = {name: [] for name in [BASELINE, *names, UNCONSTRAINED, *extra]}
    order = list(runs)
    # warm-up rounds on the first prompt (untimed), then every prompt once, the methods interleaved per prompt
    schedule = [(0, False)] * args.warmup + [(i, True) for i in range(len(prompts))]
    with tqdm(
        total=len(schedule) * len(order), desc="structured", unit="run", file=sys.stderr, disable=None
    ) as bar:
        for i, timed in schedule:
            prompt = prompts[i]
            for name in order:
                out: Outcome | None
                if name == BASELINE:
                    out = _hf(model, tokenizer, eos, prompt, ids[i], params)
                elif name == LLAMACPP:
                    assert gbnf is not None
                    out = gbnf.run(prompt, ids[i])
                else:
                    decoder = decoders["auto" if name == UNCONSTRAINED else name]
                    out = _specdec(decoder, prompt, ids[i], params, name != UNCONSTRAINED)
                if timed:
                    if out is not None:
                        out.valid = valid(prompt, tokenizer, vocab, eos, out.tokens)
                    runs[name].append(out)
                bar.update(1)
    rows = summarize(prompts, runs, params, tokenizer)
    print(table(rows))
    if args.json is not None:
        data = {
            "settings": {"methods": order, "greedy": params.greedy, "prompts": len(prompts)},
            "rows": [asdict(r) for r in rows],
        }
        args.json.write_text(json.dumps(data, indent=1))
    broken = [r for r in rows if r.lossless is False and r.kind == "overall"]
    for r in broken:
        for m in r.mismatches:
            print(f"specdec bench: {r.method}: output differs from {BASELINE}'s on {m}", file=sys.stderr)
    return 1 if broken else 0


def summarize(
    prompts: list[StructuredPrompt], runs: dict[str, list[Outcome | None]], params: SamplingParams, tokenizer
) -> list[Row]:
    """Per kind (and overall) a row per method, over the prompts it ran (llama.cpp's: those that convert)."""
    rows = []
    for kind in [*dict.fromkeys(p.kind for p in prompts), "overall"]:
        picked = [i for i, p in enumerate(prompts) if kind in ("overall", p.kind)]
        for name, outs in runs.items():
            ran = [i for i in picked if outs[i] is not None]
            mine = [o for o in (outs[i] for i in ran) if o is not None]
            if mine:
                rows.append(_row(kind, name, [prompts[i] for i in ran], mine, runs, ran, params))
    return rows


def _row(
    kind: str,
    name: str,
    prompts: list[StructuredPrompt],
    mine: list[Outcome],
    runs: dict[str, list[Outcome | None]],
    ran: list[int],
    params: SamplingParams,
) -> Row:
    """One method's row over the prompts `ran` (indices into `runs`' lists; `mine`: its outcomes there)."""

    def rate(outs: list[Outcome]) -> float:
        return sum(len(o.tokens) for o in outs) / max(1e-9, sum(o.seconds for o in outs))

    def of(method: str) -> list[Outcome]:  # the baseline and unconstrained auto run every prompt
        return [o for o in (runs[method][i] for i in ran) if o is not None]

    base, free = of(BASELINE), of(UNCONSTRAINED)
    constrained = name != UNCONSTRAINED
    differs = [p.source for p, o, b in zip(prompts, mine, base, strict=True) if o.tokens != b.tokens]
    checked = params.greedy and name not in (BASELINE, UNCONSTRAINED, LLAMACPP)
    seconds = sum(o.seconds for o in mine)
    return Row(
        kind=kind,
        method=name,
        prompts=len(mine),
        valid=sum(o.valid for o in mine) / len(mine) if constrained else float("nan"),
        tokens_per_second=rate(mine),
        speedup=sum(b.seconds for b in base) / max(seconds, 1e-9) if constrained else None,
        vs_unconstrained=rate(mine) / rate(free) if constrained else None,
        tau=sum(len(o.tokens) for o in mine) / max(1, sum(o.forwards for o in mine)),
        forced_per_output=sum(o.forced for o in mine) / len(mine),
        grammar_share=sum(o.grammar_seconds for o in mine) / max(seconds, 1e-9),
        lossless=(not differs) if checked else None,
        mismatches=differs if checked else [],
    )


def table(rows: list[Row]) -> str:
    def f(x, fmt: str) -> str:
        return "-" if x is None or x != x else format(x, fmt)

    head = "| task | method | valid | tok/s | x generate() | x unconstrained auto | tau | forced/output | grammar time | lossless |"
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lossless = "-" if r.lossless is None else "yes" if r.lossless else f"NO ({len(r.mismatches)})"
        lines.append(
            f"| {r.kind} | {r.method} | {f(r.valid * 100 if r.valid == r.valid else None, '.0f')}% | "
            f"{r.tokens_per_second:.1f} | {f(r.speedup, '.2f')}x | {f(r.vs_unconstrained, '.2f')}x | {r.tau:.2f} | "
            f"{r.forced_per_output:.1f} | {r.grammar_share * 100:.1f}% | {lossless} |"
        )
    return "\n".join(lines)
