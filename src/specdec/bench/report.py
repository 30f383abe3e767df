"""Turn per-run records into one row per task x method: the terminal table, the JSON report and the plot."""

from __future__ import annotations

import os
import platform
import statistics
import sys
from pathlib import Path

import torch

from specdec.bench.methods import BASELINE, HF_PROMPT_LOOKUP_TOKENS
from specdec.bench.runner import BenchResult, Mismatch, Record, tie_gap
from specdec.bench.tasks import BenchPrompt
from specdec.errors import InputError
from specdec.sampling import SamplingParams

OVERALL = "overall"
SAMPLED_NOTE = "n/a (sampled; see statistical tests)"


def _row(
    task: str, method: str, runs: list[Record], base: list[Record], sampled: bool, mismatches, ties
) -> dict:
    seconds = sum(r.seconds for r in runs)
    tokens = sum(r.new_tokens for r in runs)
    forwards = sum(r.target_forwards for r in runs)
    ratios = [b.seconds / r.seconds for b, r in zip(base, runs, strict=True) if r.seconds > 0]
    return {
        "task": task,
        "method": method,
        "prompts": len(runs),
        "speedup": sum(b.seconds for b in base) / seconds if seconds else None,  # ratio of summed wall times
        "median_speedup": statistics.median(ratios) if ratios else None,  # median of per-prompt ratios
        "tokens_per_second": tokens / seconds if seconds else None,
        "mean_accepted_tokens": tokens / forwards if forwards else None,  # tau: tokens per target forward
        "new_tokens": tokens,
        "target_forwards": forwards,
        "wall_seconds": seconds,
        "lossless": None if sampled else mismatches == 0,
        "lossless_note": SAMPLED_NOTE if sampled else None,
        "mismatches": None if sampled else mismatches,
        "numerical_ties": None if sampled else ties,
    }


def summarize(result: BenchResult, sampled: bool) -> tuple[list[dict], list[dict]]:
    """(rows per task x method, overall rows per method); tasks in order of first appearance."""
    names = [m.name for m in result.methods]
    tasks = list(dict.fromkeys(r.task for r in result.records))

    def pick(task: str | None, method: str) -> list[Record]:
        runs = [r for r in result.records if r.method == method and (task is None or r.task == task)]
        return sorted(runs, key=lambda r: r.prompt)

    def bad(task: str | None, method: str, tie: bool) -> int:
        return sum(
            1
            for m in result.mismatches
            if m.method == method and m.numerical_tie == tie and (task is None or m.task == task)
        )

    rows: list[dict] = []
    overall: list[dict] = []
    scopes: list[tuple[str | None, list[dict]]] = [(t, rows) for t in tasks]
    for scope, out in [*scopes, (None, overall)]:
        for name in names:
            runs = pick(scope, name)
            if runs:
                row = _row(
                    scope or OVERALL,
                    name,
                    runs,
                    pick(scope, names[0]),  # the baseline: `methods.baseline`
                    sampled,
                    bad(scope, name, False),
                    bad(scope, name, True),
                )
                out.append(row)
    return rows, overall


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _lossless_cell(row: dict) -> str:
    if row["lossless"] is None:
        return SAMPLED_NOTE
    ties = (
        f" ({row['numerical_ties']} numerical tie{'s' if row['numerical_ties'] != 1 else ''})"
        if row["numerical_ties"]
        else ""
    )
    if row["lossless"]:
        return "yes" + ties
    return f"NO: {row['mismatches']} mismatch{'es' if row['mismatches'] != 1 else ''}" + ties


def table(rows: list[dict], overall: list[dict]) -> str:
    header = ["task", "method", "speedup", "median", "tok/s", "tau", "lossless"]
    body = []
    for row in rows + overall:
        body.append(
            [
                row["task"],
                row["method"],
                _fmt(row["speedup"], ".2f") + "x",
                _fmt(row["median_speedup"], ".2f") + "x",
                _fmt(row["tokens_per_second"], ".1f"),
                _fmt(row["mean_accepted_tokens"], ".2f"),
                _lossless_cell(row),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    numeric = {2, 3, 4, 5}

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out, previous = [line(header), line(["-" * w for w in widths])], None
    for cells in body:
        if previous is not None and cells[0] != previous:
            out.append("")
        out.append(line(cells))
        previous = cells[0]
    return "\n".join(out)


def describe_mismatch(m: Mismatch, tokenizer, baseline: str = BASELINE) -> str:
    def tok(t: int | None) -> str:
        return "(stopped)" if t is None else f"{t} {tokenizer.decode([t])!r}"

    label = "numerical tie" if m.numerical_tie else "MISMATCH"
    return (
        f"{label}: {m.method} on {m.task} prompt {m.index} ({m.source}): first difference at generated token "
        f"{m.position}: {baseline} {tok(m.expected)}, {m.method} {tok(m.got)}; the target's top-2 there are "
        f"{tok(m.top1)} and {tok(m.top2)}, logit gap {m.gap:.3g}"
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_model(model, name: str) -> dict:
    from specdec.models.gguf_target import GGUFTarget

    if isinstance(model, GGUFTarget):
        return {
            "name": name,
            "class": "GGUFTarget",
            "description": model.description,  # llama.cpp's: architecture, size, file type (its quantization)
            "file_bytes": model.path.stat().st_size,
        }
    return {
        "name": name,
        "class": type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }


def environment(model, model_name: str, draft_model, draft_name: str | None) -> dict:
    import transformers

    import specdec

    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "specdec": specdec.__version__,
        "model": describe_model(model, model_name),
        "draft": None if draft_model is None else describe_model(draft_model, draft_name or ""),
    }


def settings(
    args, prompts: list[BenchPrompt], result: BenchResult, params: SamplingParams, per_task, model=None
) -> dict:
    """The report's settings block: what ran, on what, how often."""
    return {
        "tasks": list(dict.fromkeys(p.task for p in prompts)),
        "methods": [m.name for m in result.methods],
        "baseline": result.methods[
            0
        ].name,  # every speedup is over it, every greedy output checked against it
        "prompts": len(prompts),
        "prompts_per_task": per_task,
        "max_new_tokens": params.max_new_tokens,
        "temperature": params.temperature,
        "top_k": params.top_k,
        "top_p": params.top_p,
        "seed": params.seed,
        "dtype": args.dtype or "auto",  # as asked (the model's own: env.model.dtype)
        "runtime": args.runtime,
        # what ran each method's target forwards (hf-* methods: transformers' own generate())
        "method_runtimes": {m.name: getattr(m, "runtime", "generate()") for m in result.methods},
        "warmup_rounds": args.warmup,
        "repeats": args.repeats,  # timed rounds per prompt; each method's fastest is kept
        "quick": args.quick,
        "hf_prompt_lookup_num_tokens": HF_PROMPT_LOOKUP_TOKENS,
        "numerical_tie_gap": tie_gap(model),
        "chat_history": f"later turns hold {result.methods[0].name}'s own answer to the earlier turns from this run",
        "torch_threads": torch.get_num_threads(),
    }


# a run slower than this share of its method's usual speed is flagged (`slow_runs`)
SLOW_SHARE = 1 / 3


def slow_runs(result: BenchResult) -> list[dict]:
    """Runs that fell under SLOW_SHARE of their method's median speed on the task, each prompt's own pace taken
    out: a run's tokens per second over the median across methods on that prompt (prompts differ: a longer one
    is slower for every method), against the median of that ratio over the method's prompts of the task. What
    it flags is a stall of the machine or the process (a competing thread pool, a timing taken under load),
    not the method's speed."""
    import statistics

    def rate(r: Record) -> float:
        return r.new_tokens / r.seconds if r.seconds > 0 else float("inf")

    pace: dict[int, float] = {}
    for prompt in {r.prompt for r in result.records}:
        pace[prompt] = statistics.median(rate(r) for r in result.records if r.prompt == prompt)
    groups: dict[tuple[str, str], list[Record]] = {}
    for r in result.records:
        groups.setdefault((r.method, r.task), []).append(r)
    flagged = []
    for (method, task), runs in groups.items():
        if len(runs) < 3:  # no median to speak of
            continue
        usual = statistics.median(rate(r) / pace[r.prompt] for r in runs)
        for r in runs:
            if rate(r) / pace[r.prompt] < SLOW_SHARE * usual:
                where = {"method": method, "task": task, "prompt": r.prompt, "index": r.index}
                flagged.append({**where, "tokens_per_second": rate(r), "prompt_median": pace[r.prompt]})
    return flagged


def report(result: BenchResult, env: dict, settings: dict, skipped: dict[str, str], sampled: bool) -> dict:
    rows, overall = summarize(result, sampled)
    return {
        "slow_runs": slow_runs(result),
        "env": env,
        "settings": settings,
        "results": rows,
        "overall": overall,
        "mismatches": [m.to_dict() for m in result.mismatches],
        "runs": [r.to_dict() for r in result.records],
        "skipped_methods": skipped,
    }


def plot(rows: list[dict], out: Path, baseline: str = BASELINE) -> None:
    """Speedup per task (groups) and method (bars), tau written over each bar; the baseline is the 1x line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib (pip install 'specdec[bench]')") from None
    tasks = list(dict.fromkeys(r["task"] for r in rows))
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != baseline]
    cell = {(r["task"], r["method"]): r for r in rows}
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 + len(tasks) * len(methods) * 0.45), 4.5))
    for k, method in enumerate(methods):
        xs, ys, taus = [], [], []
        for t, task in enumerate(tasks):
            row = cell.get((task, method))
            if row is None or row["speedup"] is None:
                continue
            xs.append(t - 0.4 + width * (k + 0.5))
            ys.append(row["speedup"])
            taus.append(row["mean_accepted_tokens"])
        bars = ax.bar(xs, ys, width, label=method)
        for bar, tau in zip(bars, taus, strict=True):
            if tau is not None:
                ax.annotate(
                    f"{tau:.1f}",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(range(len(tasks)), tasks)
    ax.set_ylabel(f"speedup vs {baseline} (wall time)")
    ax.set_title("specdec bench: speedup per task (over each bar: tau)", fontsize=10)
    ax.legend(fontsize=8, ncols=2)
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=120)
    except OSError as e:
        raise InputError(f"cannot write plot {str(out)!r}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
