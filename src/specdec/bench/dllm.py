"""`specdec bench --model default-dllm --policies ...`: the speed/quality trade-off of diffusion decoding.

Per task and policy setting: tokens per forward, wall tokens/s, speedup against the `one` policy, against the
AR target decoded by transformers' generate() and by specdec (`auto`, lossless), and quality: agreement with the
AR target's greedy output (position by position), bits per byte of the output as judged by the AR target (its
own greedy output is the reference), and whether prompt + output still tokenises as Python. A synthetic suite
(`parallel`: copy, reverse, count, close brackets, answers known) shows where committing tokens together breaks.

Everything runs interleaved per prompt after a warm-up, in one process, so the ratios compare like with like.
"""

from __future__ import annotations

import io
import json
import math
import random
import statistics
import sys
import time
import tokenize
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from specdec.errors import InputError
from specdec.sampling import SamplingParams

# one (the reference) in both orders, threshold swept down to where quality collapses, the others at their
# defaults and one looser setting each
DEFAULT_POLICIES = (
    "one,one:order=confidence,"
    "threshold:threshold=0.9,threshold:threshold=0.7,threshold:threshold=0.5,threshold:threshold=0.3,"
    "threshold:threshold=0.1,localleap,localleap:threshold=0.7;relaxed_threshold=0.3,credit,"
    "credit:threshold=0.7,adablock,learn2pd:threshold=0.9,learn2pd:threshold=0.7,learn2pd:threshold=0.5"
)
PARALLEL_TASK = "parallel"


@dataclass
class Sample:
    task: str
    label: str  # "hf-vanilla", "auto", or a policy setting such as "threshold:threshold=0.7"
    seconds: float
    tokens: int
    forwards: int
    agreement: float  # fraction of the AR greedy output's positions this output matches
    bits: float  # -log2 p_AR(output | prompt)
    bytes: int  # of the output text
    python_ok: bool | None  # prompt + output tokenises as Python (None: not a code task)
    correct: bool | None = None  # synthetic tasks: output starts with the known answer


@dataclass
class Synthetic:
    kind: str
    prompt: str
    answer: str


def _two_lists(rng: random.Random, high: int, shortest: int, longest: int) -> tuple[list[int], list[int]]:
    """Two lists of the same random length in [shortest, longest], of integers in [1, high]."""
    a = [rng.randint(1, high) for _ in range(rng.randint(shortest, longest))]
    return a, [rng.randint(1, high) for _ in range(len(a))]


def parallel_suite(per_kind: int = 6, seed: int = 0) -> list[Synthetic]:
    """Small tasks with one right answer, where the tokens of the answer depend on each other."""
    rng = random.Random(seed)
    out = []
    for _ in range(per_kind):
        a, b = _two_lists(rng, 99, 5, 8)
        prompt = f"values = {a}\nsame_values = {a}\nitems = {b}\nsame_items = ["
        out.append(Synthetic("copy", prompt, ", ".join(map(str, b)) + "]"))
        a, b = _two_lists(rng, 9, 4, 6)
        prompt = f"xs = {a}\nreversed_xs = {a[::-1]}\nys = {b}\nreversed_ys = ["
        out.append(Synthetic("reverse", prompt, ", ".join(map(str, b[::-1])) + "]"))
        start = rng.randint(1, 40)
        seen = list(range(start, start + rng.randint(5, 8)))
        nxt = list(range(seen[-1] + 1, seen[-1] + 7))
        out.append(
            Synthetic("count", f"numbers = [{', '.join(map(str, seen))},", " " + ", ".join(map(str, nxt)))
        )
        depth = rng.randint(3, 6)
        opens = [rng.choice("([{") for _ in range(depth)]
        close = {"(": ")", "[": "]", "{": "}"}
        body = "".join(o if o != "{" else "{'k': " for o in opens)
        closing = "".join(close[o] for o in reversed(opens)) + ")"
        out.append(Synthetic("brackets", f"result = f({body}1", closing))
    return out


def python_tokenises(text: str) -> bool:
    """Whether prompt + completion lexes as Python up to where the completion was cut. A completion stops at
    max_new_tokens, often inside a bracket or a string: reaching the end of the text there is the cut, not a
    defect. An error token or an unmatched dedent before the last line is."""
    last = text.count("\n") + 1
    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.ERRORTOKEN and tok.string.strip() and tok.start[0] < last:
                return False
    except tokenize.TokenError:  # "EOF in multi-line statement/string": the text ends inside one
        return True
    except IndentationError:
        return False
    except SyntaxError as e:  # newer tokenizers report an unterminated string this way
        return (e.lineno or 0) >= last
    return True


class Judge:
    """The AR target scoring outputs: bits of a continuation given its prompt."""

    def __init__(self, model) -> None:
        self.model = model

    @torch.inference_mode()
    def bits(self, prompt_ids: list[int], output_ids: list[int]) -> float:
        if not output_ids:
            return 0.0
        ids = torch.tensor([prompt_ids + output_ids])
        logits = self.model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1].float()
        nats = torch.nn.functional.cross_entropy(logits, torch.tensor(output_ids), reduction="sum")
        return float(nats) / math.log(2)


def _agreement(out: list[int], ref: list[int]) -> float:
    if not ref:
        return 1.0
    return sum(1 for a, b in zip(out, ref, strict=False) if a == b) / len(ref)


@dataclass
class Row:
    task: str
    label: str
    prompts: int
    tokens_per_forward: float
    tokens_per_second: float
    speedup_vs_one: float | None
    speedup_vs_hf: float
    speedup_vs_auto: float | None
    agreement: float
    bits_per_byte: float
    bpb_vs_one: float | None
    python_ok: float | None
    accuracy: float | None = None
    extra: dict = field(default_factory=dict)


def summarise(samples: list[Sample], labels: list[str]) -> list[Row]:
    """Rows per task (and "overall" across the held-out tasks) and label; ratios of summed time and tokens."""
    tasks = list(dict.fromkeys(s.task for s in samples))
    real = [t for t in tasks if t != PARALLEL_TASK]
    groups = [(t, [t]) for t in tasks] + ([("overall", real)] if len(real) > 1 else [])
    rows = []
    for name, members in groups:
        chosen = [s for s in samples if s.task in members]

        def rate(label: str, chosen=chosen) -> float | None:
            mine = [s for s in chosen if s.label == label]
            seconds = sum(s.seconds for s in mine)
            return sum(s.tokens for s in mine) / seconds if mine and seconds else None

        def bpb(label: str, chosen=chosen) -> float | None:
            mine = [s for s in chosen if s.label == label]
            total = sum(s.bytes for s in mine)
            return sum(s.bits for s in mine) / total if mine and total else None

        base_hf, base_auto, base_one = rate("hf-vanilla"), rate("auto"), rate("one")
        one_bpb = bpb("one")
        for label in labels:
            mine = [s for s in chosen if s.label == label]
            if not mine:
                continue
            tps = rate(label) or 0.0
            my_bpb = bpb(label) or 0.0
            py = [s.python_ok for s in mine if s.python_ok is not None]
            acc = [s.correct for s in mine if s.correct is not None]
            rows.append(
                Row(
                    task=name,
                    label=label,
                    prompts=len(mine),
                    tokens_per_forward=sum(s.tokens for s in mine) / max(1, sum(s.forwards for s in mine)),
                    tokens_per_second=tps,
                    speedup_vs_one=tps / base_one if base_one else None,
                    speedup_vs_hf=tps / base_hf if base_hf else 0.0,
                    speedup_vs_auto=tps / base_auto if base_auto else None,
                    agreement=statistics.fmean(s.agreement for s in mine),
                    bits_per_byte=my_bpb,
                    bpb_vs_one=my_bpb / one_bpb if one_bpb else None,
                    python_ok=statistics.fmean(py) if py else None,
                    accuracy=statistics.fmean(acc) if acc else None,
                )
            )
    return rows


def table(rows: list[Row]) -> str:
    def f(x, fmt):
        return "-" if x is None else format(x, fmt)

    head = (
        "| task | decoder | tok/fwd | tok/s | x one | x hf | x auto | agree | bpb | bpb/one | py ok | acc |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r.task} | {r.label} | {r.tokens_per_forward:.2f} | {r.tokens_per_second:.0f} | "
            f"{f(r.speedup_vs_one, '.2f')} | {r.speedup_vs_hf:.2f} | {f(r.speedup_vs_auto, '.2f')} | "
            f"{r.agreement:.2f} | {r.bits_per_byte:.3f} | {f(r.bpb_vs_one, '.3f')} | "
            f"{f(r.python_ok, '.2f')} | {f(r.accuracy, '.2f')} |"
        )
    return "\n".join(lines)


def _short(label: str) -> str:
    """'localleap:threshold=0.7;relaxed_threshold=0.3' -> 'localleap 0.7/0.3' for the plot."""
    name, _, options = label.partition(":")
    values = [v.partition("=")[2] for v in options.split(";") if v]
    return f"{name} {'/'.join(values)}" if values else name


def plot(rows: list[Row], out: Path, references: Iterable[str] = ("hf-vanilla", "auto")) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    references = set(references)
    overall = [r for r in rows if r.task == "overall"] or rows
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in overall:
        ar = r.label in references
        ax.scatter(r.speedup_vs_hf, r.bits_per_byte, marker="s" if ar else "o", s=50)
        ax.annotate(
            _short(r.label),
            (r.speedup_vs_hf, r.bits_per_byte),
            fontsize=7,
            xytext=(4, 2),
            textcoords="offset points",
        )
    # the collapse at low thresholds is several times the reference: a log scale keeps both legible
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
    ax.set_xlabel("wall tokens/s relative to transformers' generate() on the AR target")
    ax.set_ylabel("AR-judged bits per byte of the output (lower: more AR-like)")
    ax.set_title("diffusion decoding: speed vs quality (squares: the AR target, lossless)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args) -> int:
    """The diffusion bench behind `specdec bench` (see the module docstring)."""
    from specdec.bench.methods import ForwardCounter, HFMethod, Method, SpecdecMethod
    from specdec.dllm.api import DllmDecoder
    from specdec.dllm.cli import engine_options
    from specdec.dllm.policies import make_policy
    from specdec.models.loading import load_causal_lm

    configs = policy_configs(
        args.policies or DEFAULT_POLICIES
    )  # every setting checked before any model loads
    params = bench_params(args)
    per_task = args.prompts or (2 if args.quick else None)
    tasks = check_tasks(args.tasks)

    dllm, tokenizer = load_causal_lm(args.model, "target", args.dtype or "auto")
    ar, ar_tokenizer = load_causal_lm(args.ar_model, "target", args.dtype or "auto")
    if ar_tokenizer is None or tokenizer is None:
        raise InputError("both models need a tokenizer")
    decoders = {
        label: DllmDecoder(
            dllm, tokenizer, make_policy(name, **options), name=args.model, **engine_options(args)
        )
        for label, name, options in configs
    }
    counter = ForwardCounter(ar)
    references: dict[str, Method] = {"hf-vanilla": HFMethod("hf-vanilla", ar, counter)}
    for name in args.methods or ["auto"]:
        references[name] = SpecdecMethod(name, ar, ar_tokenizer)
    contest = Contest(references, decoders, ar_tokenizer, Judge(ar))
    samples = contest.run_all(bench_prompts(tasks, per_task), params)
    counter.close()
    rows = summarise(samples, contest.order())
    print(table(rows))
    data = {
        "settings": settings(args, list(decoders), list(references), params, per_task, tasks),
        "rows": [asdict(r) for r in rows],
        "samples": [asdict(s) for s in samples],
    }
    if args.json is not None:
        Path(args.json).write_text(json.dumps(data, indent=1))
    if args.plot is not None:
        plot(rows, Path(args.plot), references)
    return 0


def policy_configs(text: str) -> list[tuple[str, str, dict]]:
    """--policies as (label, policy, options), each setting checked (InputError before any model loads)."""
    from specdec.dllm.cli import parse_policy_list
    from specdec.dllm.policies import make_policy

    configs = parse_policy_list(text)
    for _, name, options in configs:
        make_policy(name, **options)
    labels = [label for label, _, _ in configs]
    if len(set(labels)) != len(labels):
        raise InputError("--policies names the same setting twice")
    return configs


def bench_params(args) -> SamplingParams:
    """The sampling settings of every generation (128 new tokens, 64 with --quick; sampled: seed 0 unless
    given), checked."""
    params = SamplingParams(
        max_new_tokens=args.max_new_tokens or (64 if args.quick else 128),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=0 if args.seed is None and args.temperature else args.seed,
    )
    params.validate()
    return params


def check_tasks(tasks: list[str] | None) -> list[str]:
    """The tasks asked for (default: every built-in suite and the synthetic one), checked."""
    from specdec.bench.tasks import suites

    tasks = tasks or [*suites(), PARALLEL_TASK]
    for t in tasks:
        if t != PARALLEL_TASK and t not in suites():
            raise InputError(f"unknown task {t!r} (choose from {', '.join([*suites(), PARALLEL_TASK])})")
    return tasks


def bench_prompts(tasks: list[str], per_task: int | None) -> list[tuple[str, str, str | None]]:
    """(task, text, known answer) for the first `per_task` prompts of every task (None: all of them)."""
    from specdec.bench.tasks import load_suite

    prompts: list[tuple[str, str, str | None]] = []
    for t in tasks:
        items: list[tuple[str, str, str | None]]
        if t == PARALLEL_TASK:
            items = [(t, s.prompt, s.answer) for s in parallel_suite()]
        else:
            items = [(t, p.text or "", None) for p in load_suite(t)]
        prompts += items[:per_task] if per_task else items
    return prompts


@dataclass
class Contest:
    """The AR references (hf-vanilla first) and the diffusion decoders (by policy setting), run interleaved
    on every prompt, each output judged right after its run."""

    references: dict[str, Any]  # label -> `Method`
    decoders: dict[str, Any]  # label -> `DllmDecoder`
    tokenizer: Any  # the AR target's
    judge: Judge

    def order(self) -> list[str]:
        return list(self.references) + list(self.decoders)

    def run_all(self, prompts: list[tuple[str, str, str | None]], params: SamplingParams) -> list[Sample]:
        """Every prompt, after a warm-up on the first one (its runs are not kept)."""
        from tqdm import tqdm

        samples: list[Sample] = []
        bar = tqdm(total=len(prompts) + 1, desc="bench dllm", unit="prompt", file=sys.stderr, disable=None)
        with bar:
            for index, (task, text, answer) in enumerate([prompts[0], *prompts]):
                samples += self.prompt(task, text, answer, params, warm=index == 0)
                bar.update(1)
        return samples

    def prompt(
        self, task: str, text: str, answer: str | None, params: SamplingParams, warm: bool
    ) -> list[Sample]:
        """Every label on one prompt (a synthetic one with room for its known answer and a few tokens more)."""
        ids = self.tokenizer(text)["input_ids"]
        if answer is not None:
            length = len(self.tokenizer(answer)["input_ids"]) + 4
            params = SamplingParams(**{**asdict(params), "max_new_tokens": length})
        reference: list[int] | None = None
        samples = []
        for label in self.order():
            out_ids, seconds, forwards = self.generate(label, ids, params)
            if label == "hf-vanilla":
                reference = out_ids
            if not warm:
                out = (out_ids, seconds, forwards)
                samples.append(self.sample(task, label, text, answer, ids, out, reference or []))
        return samples

    def generate(self, label: str, ids: list[int], params: SamplingParams) -> tuple[list[int], float, int]:
        """(token ids, seconds, target forwards) of one label's generation."""
        if label in self.references:
            run_ = self.references[label].run(ids, params)
            return run_.token_ids, run_.seconds, run_.target_forwards
        t0 = time.perf_counter()
        g = self.decoders[label].generate(ids, **_as_kwargs(params))
        return g.token_ids, time.perf_counter() - t0, g.stats.target_forwards

    def sample(
        self,
        task: str,
        label: str,
        text: str,
        answer: str | None,
        ids: list[int],
        out: tuple[list[int], float, int],
        reference: list[int],
    ) -> Sample:
        out_ids, seconds, forwards = out
        out_text = self.tokenizer.decode(out_ids, skip_special_tokens=True)
        return Sample(
            task=task,
            label=label,
            seconds=seconds,
            tokens=len(out_ids),
            forwards=forwards,
            agreement=_agreement(out_ids, reference),
            bits=self.judge.bits(ids, out_ids),
            bytes=max(1, len(out_text.encode())),
            python_ok=None if answer is not None else python_tokenises(text + out_text),
            correct=None if answer is None else out_text.startswith(answer),
        )


def settings(
    args, labels: list[str], references: list[str], params: SamplingParams, per_task, tasks: list[str]
) -> dict:
    """The report's settings block."""
    from specdec.dllm.cli import engine_options

    return {
        "model": args.model,
        "ar_model": args.ar_model,
        "policies": labels,
        "ar_references": references,
        "engine": engine_options(args),
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "prompts_per_task": per_task,
        "tasks": tasks,
        "torch_threads": torch.get_num_threads(),
        "not_lossless": "diffusion policies trade quality for speed; hf-vanilla and auto are the AR target",
    }


def _as_kwargs(p: SamplingParams) -> dict:
    return {
        "max_new_tokens": p.max_new_tokens,
        "temperature": p.temperature,
        "top_k": p.top_k,
        "top_p": p.top_p,
        "seed": p.seed,
    }
