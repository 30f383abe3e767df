"""`specdec bench --scale NAME`: every method on a model of real size, random weights, forced acceptance.

The target is built in memory from a published shape (`specdec.models.scale`) in its release precision. Each
prompt carries its real continuation (the suites' "reference", or a prompts file's), and every method, the
transformers and llama.cpp baselines too, decodes exactly that text: the forwards run on the real-size model,
while each verdict is forced along the reference (`specdec.bench.forcing`). So tok/s is what a user of that
model gets from a model that writes that text, and τ is what a drafter gets on that text. It is not a
trained model: a trained model writes its own text, and the trained heads (eagle, medusa, hydra) need weights
trained for it, so they appear only as a cost projection (`specdec.bench.heads_cost`).

Reported per task and method: tok/s, speedup end to end and decode-only (TPOT: time after the first token
per later token, the usual definition) over specdec's own plain decoding and over `generate()`, τ, drafted
nodes per step, the draft/verify/other split, and the time to the first token (the prefill). Then the
forward-cost curve of each runtime at this scale (`CostModel.measure`).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from specdec.bench.runner import BenchResult, Record
from specdec.errors import InputError

SCALE_TASKS = ("complete", "long", "edit")  # the built-in suites that carry references
# what runs by default: the baselines, specdec's plain decoding (the decode-only yardstick) and the drafters
# that need no trained weights (draft needs a draft model of this vocabulary, the heads a head trained for the
# target: neither exists for random weights); llamacpp runs where the GGUF conversion takes the shape
SCALE_METHODS = (
    "hf-vanilla",
    "hf-prompt-lookup",
    "vanilla",
    "pld",
    "suffix",
    "recycle",
    "merge",
    "lookahead",
    "auto",
    "llamacpp",
)
PLAIN = "vanilla"  # specdec's own plain decoding: what decode-only speedups are measured against
MIN_REFERENCE = 16  # tokens of reference a prompt needs


def release_dtype(config) -> str:
    """The dtype a shape is published in (bfloat16 when its config does not say)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.bfloat16
    name = str(dtype).removeprefix("torch.")
    return name if name in ("float32", "bfloat16", "float16") else "bfloat16"


def scale_prompts(prompts, tokenizer, model, max_new_tokens: int):
    """(prompts that carry a reference of at least MIN_REFERENCE tokens, their reference ids)."""
    from specdec.bench.forcing import reference_ids
    from specdec.engine import eos_token_ids

    stop = eos_token_ids(model, tokenizer)
    kept, refs = [], []
    for p in prompts:
        if p.text is None or p.reference is None:
            continue
        ids = reference_ids(tokenizer, p.text, p.reference, p.max_new_tokens or max_new_tokens, stop)
        if len(ids) >= MIN_REFERENCE:
            kept.append(p)
            refs.append(ids)
    if not kept:
        raise InputError(
            f"no prompt carries a reference of {MIN_REFERENCE}+ tokens (--scale forces acceptance along each "
            "prompt's real continuation: the complete, long and edit suites carry one; a prompts file line "
            'may give "reference")'
        )
    return kept, refs


def _sum(runs: list[Record], field: str) -> float:
    return sum(getattr(r, field) or 0.0 for r in runs)


def _decode(runs: list[Record]) -> float | None:
    """Seconds per token after the first (TPOT), over the runs."""
    later = sum(r.new_tokens - 1 for r in runs)
    spent = sum(r.seconds - (r.first_seconds or 0.0) for r in runs)
    return spent / later if later > 0 and all(r.first_seconds is not None for r in runs) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def _row(task: str, name: str, runtime: str, runs: list[Record], plain, hf) -> dict:
    """One task (or "overall") x method row; `plain`, `hf`: vanilla's and the baseline's runs there (hf-vanilla,
    or llama.cpp's loop for a GGUF target: the `*_vs_generate` fields are then over it)."""
    seconds, tokens = _sum(runs, "seconds"), sum(r.new_tokens for r in runs)
    forwards = sum(r.target_forwards for r in runs)
    specdec = runs[0].draft_seconds is not None  # specdec's methods report the split and drafted nodes
    split = [_sum(runs, f) for f in ("draft_seconds", "verify_seconds", "other_seconds")]
    decode = _decode(runs)
    return {
        "task": task,
        "method": name,
        "runtime": runtime,
        "prompts": len(runs),
        "new_tokens": tokens,
        "tokens_per_second": tokens / seconds if seconds else None,
        "speedup_vs_plain": _ratio(_sum(plain, "seconds"), seconds) if plain else None,
        "decode_speedup_vs_plain": _ratio(_decode(plain), decode) if plain else None,
        "speedup_vs_generate": _ratio(_sum(hf, "seconds"), seconds) if hf else None,
        "decode_speedup_vs_generate": _ratio(_decode(hf), decode) if hf else None,
        "mean_accepted_tokens": tokens / forwards if forwards else None,
        "drafted_nodes_per_step": sum(r.draft_nodes or 0 for r in runs) / forwards if specdec else None,
        "split": [x / seconds for x in split] if specdec and seconds else None,
        "first_token_ms": 1e3 * _sum(runs, "first_seconds") / len(runs),
        "tpot_ms": None if decode is None else 1e3 * decode,
        "exact": all(r.match for r in runs),
    }


def summarize(result: BenchResult) -> list[dict]:
    """One row per task (and "overall") and method."""
    runtimes = {m.name: getattr(m, "runtime", "generate()") for m in result.methods}
    tasks = list(dict.fromkeys(r.task for r in result.records))
    rows = []
    for task in [*tasks, None]:

        def pick(name: str, task=task) -> list[Record]:
            return [r for r in result.records if r.method == name and (task is None or r.task == task)]

        plain, hf = pick(PLAIN), pick(result.methods[0].name)  # the baseline: `methods.baseline`
        for m in result.methods:
            runs = pick(m.name)
            if runs:
                rows.append(_row(task or "overall", m.name, runtimes[m.name], runs, plain, hf))
    return rows


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def table(rows: list[dict], baseline: str = "generate()") -> str:
    """Markdown: the forced-acceptance table."""
    out = [
        f"| task | method | runtime | tok/s | vs plain e2e | vs plain TPOT | vs {baseline} e2e | τ | nodes/step "
        "| draft/verify/other | first token | emits the reference |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        split = "-" if r["split"] is None else "/".join(f"{100 * s:.0f}" for s in r["split"]) + " %"
        out.append(
            f"| {r['task']} | {r['method']} | {r['runtime']} | {_fmt(r['tokens_per_second'], '.1f')} "
            f"| {_fmt(r['speedup_vs_plain'], '.2f', 'x')} | {_fmt(r['decode_speedup_vs_plain'], '.2f', 'x')} "
            f"| {_fmt(r['speedup_vs_generate'], '.2f', 'x')} | {_fmt(r['mean_accepted_tokens'], '.2f')} "
            f"| {_fmt(r['drafted_nodes_per_step'], '.1f')} | {split} | {_fmt(r['first_token_ms'], '.0f', ' ms')} "
            f"| {'yes' if r['exact'] else 'NO'} |"
        )
    return "\n".join(out)


def cost_curves(model, runtimes=("transformers", "native", "llamacpp")) -> dict[str, dict]:
    """Per runtime that runs the model: the forward cost (ms) per tree size after a 512-token past, or why not."""
    from specdec.costmodel import CostModel
    from specdec.errors import UnsupportedModelError
    from specdec.runtime import select_runtime

    curves: dict[str, dict] = {}
    for name in runtimes:
        try:
            choice = select_runtime(model, name)
        except (UnsupportedModelError, InputError) as e:
            curves[name] = {"skipped": str(e)}
            continue
        curve = CostModel.for_runtime(model, choice)
        curves[name] = {"sizes": list(curve.sizes), "ms": [round(1e3 * s, 2) for s in curve.seconds]}
    return curves


def curves_table(curves: dict[str, dict], dtype: str) -> str:
    sizes: list[int] = next((c["sizes"] for c in curves.values() if "sizes" in c), [])
    out = [
        f"| runtime ({dtype}) | " + " | ".join(f"{n} tokens" for n in sizes) + " | 16 / 1 |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for name, c in curves.items():
        if "sizes" not in c:
            out.append(f"| {name} | not run: {c['skipped']} |")
            continue
        ms = dict(zip(c["sizes"], c["ms"], strict=True))
        steep = _fmt(_ratio(ms.get(16), ms.get(1)), ".2f")
        out.append(f"| {name} | " + " | ".join(f"{t:.1f}" for t in c["ms"]) + f" | {steep} |")
    return "\n".join(out)


def build(args: argparse.Namespace):
    """(model, tokenizer, dtype name, label) for `--scale NAME` / `--scale-config PATH`."""
    from specdec.models.loading import DTYPES, load_tokenizer, resolve
    from specdec.models.scale import build_scale_model, parameter_count, scale_config

    config = scale_config(args.scale, args.scale_config)
    dtype = args.dtype or release_dtype(config)
    label = args.scale or str(args.scale_config)
    print(f"specdec bench --scale: building {label} with random weights in {dtype}", file=sys.stderr)
    model = build_scale_model(config, DTYPES[dtype])
    print(f"specdec bench --scale: {parameter_count(model) / 1e6:.0f}M parameters", file=sys.stderr)
    return model, load_tokenizer(resolve("default")), dtype, label


def run(args: argparse.Namespace, prompts, params, per_task) -> int:
    """The `--scale` bench: build, run every method forced, report (module docstring)."""
    from specdec.bench.report import environment
    from specdec.models.loading import freeze_heap

    if not params.greedy:
        raise InputError(
            "--scale forces greedy acceptance along each prompt's reference: use --temperature 0"
        )
    model, tokenizer, dtype, label = build(args)
    if args.quantize:  # the shape as a quantized GGUF file: llama.cpp's forward of it is the target
        from specdec.models.gguf_target import load_gguf, quantized

        path = quantized(model, tokenizer, f"scale-{label}-{dtype}", args.quantize)
        print(f"specdec bench --scale: the target is {path} ({args.quantize.upper()})", file=sys.stderr)
        del model
        model, tokenizer = load_gguf(path)
        dtype = args.quantize.upper()
    freeze_heap()
    prompts, refs = scale_prompts(prompts, tokenizer, model, params.max_new_tokens)
    from specdec.bench.methods import GGUF_BASELINE, baseline
    from specdec.bench.runner import all_methods, gguf_methods, run_methods, select_methods

    gguf = baseline(model) == GGUF_BASELINE
    # each skipped with its reason where it cannot run (llamacpp: a model the GGUF conversion cannot write)
    if args.methods is None and gguf:  # llama.cpp's loop is the baseline; no transformers model to generate()
        names = [GGUF_BASELINE, *(m for m in SCALE_METHODS if m in gguf_methods() and m != GGUF_BASELINE)]
    elif args.methods is None:
        names = [m for m in SCALE_METHODS if m in all_methods()]
    else:
        names = select_methods(args.methods, False, model)
    if PLAIN not in names:
        names.insert(1, PLAIN)  # the decode-only yardstick
    result, skipped = run_methods(args, prompts, model, tokenizer, None, params, names, refs)
    rows = summarize(result)
    curves = cost_curves(model, ("llamacpp",) if gguf else ("transformers", "native", "llamacpp"))
    from specdec.bench.heads_cost import heads_at_size

    heads_text, heads = "heads at size: not measured on a GGUF target", None
    if not gguf:
        heads_text, heads = heads_at_size(model)  # no head is trained for random weights: cost, projected
    print(f"forced acceptance at real size: {label}, random weights in {dtype}, NOT a trained model")
    print(table(rows, "llama.cpp's loop" if gguf else "generate()"))
    print()
    print("forward cost (ms) per tree size after a 512-token past:")
    print(curves_table(curves, dtype))
    print()
    print(heads_text)
    if args.json is not None:
        data = {
            "scale": label,
            "dtype": dtype,
            "baseline": result.methods[0].name,  # what the *_vs_generate fields are over
            "env": environment(model, label, None, None),
            "max_new_tokens": params.max_new_tokens,
            "results": rows,
            "cost_curves": curves,
            "heads": heads,
            "runs": [r.to_dict() for r in result.records],
            "skipped_methods": skipped,
        }
        try:
            args.json.write_text(json.dumps(data, indent=1))
        except OSError as e:
            raise InputError(f"cannot write {str(args.json)!r}: {e.strerror or e}") from None
    failures = [r for r in rows if not r["exact"]]
    if failures:
        print(
            f"specdec bench --scale: FORCING FAILED: {', '.join(sorted({r['method'] for r in failures}))} did "
            "not emit the reference",
            file=sys.stderr,
        )
        return 1
    return 0
