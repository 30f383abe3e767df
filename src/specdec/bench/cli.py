"""`specdec bench`: speed and losslessness of every method against transformers' generate(), side by side."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import specdec.checks as checks
from specdec.errors import InputError

QUICK_PROMPTS = 2  # per task
QUICK_MAX_NEW_TOKENS = 64
MAX_NEW_TOKENS = 128


def _csv(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list")
    return items


def register(subparsers) -> None:
    from specdec.bench.methods import HF_PROMPT_LOOKUP_TOKENS
    from specdec.bench.runner import all_methods
    from specdec.bench.tasks import suites
    from specdec.cliargs import add_model_arguments, add_report_arguments, add_sampling_arguments

    b = subparsers.add_parser(
        "bench",
        help="benchmark every method against transformers' generate() (speedup, tau, lossless check)",
        description=(
            "Runs transformers' generate() (vanilla greedy = the baseline, prompt lookup, assisted generation) "
            "and specdec's methods on the same prompts, interleaved per prompt after a warm-up, and checks that "
            "every greedy output equals hf-vanilla's token for token. Exit status 1 when one does not."
        ),
    )
    add_model_arguments(b)
    add_sampling_arguments(b, max_new_tokens=None)  # None: 128, or 64 with --quick
    b.add_argument(
        "--tasks",
        type=_csv,
        default=None,
        help=f"comma-separated built-in suites: {', '.join(suites())} (default: all of them, unless "
        "--prompts-file or --spec-bench is given); or structured alone: prompts with a JSON Schema, regex or "
        "grammar each, against transformers' constrained generate() (docs/structured.md)",
    )
    b.add_argument(
        "--methods",
        type=_csv,
        default=None,
        help=f"comma-separated, from: {', '.join(all_methods())} (hf-prompt-lookup uses "
        f"prompt_lookup_num_tokens={HF_PROMPT_LOOKUP_TOKENS}); default: every one that applies (those "
        "needing a draft model run when one is given). hf-vanilla always runs: it is the baseline. A specdec "
        "method may name its target runtime, e.g. pld@transformers beside pld (which runs on --runtime); "
        "llamacpp* run when the llamacpp extra is installed (greedy only)",
    )
    b.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help='JSONL of {"prompt": ...}, optional "kind" (task name, default "custom") and "max_new_tokens"',
    )
    b.add_argument(
        "--spec-bench",
        type=Path,
        default=None,
        metavar="QUESTIONS",
        help="Spec-Bench question.jsonl (needs a model with a chat template); grouped by category",
    )
    b.add_argument(
        "--prompts", type=int, default=None, help="at most N prompts per task (Spec-Bench: questions)"
    )
    b.add_argument(
        "--quick",
        action="store_true",
        help=f"{QUICK_PROMPTS} prompts per task and --max-new-tokens {QUICK_MAX_NEW_TOKENS} unless given",
    )
    b.add_argument("--warmup", type=int, default=1, help="warm-up rounds over every method (untimed)")
    b.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed rounds per prompt; each method keeps its fastest (other work on the machine only slows a "
        "run), every round's output is checked",
    )
    add_report_arguments(b, "write every number and the environment", "bar chart of speedup, tau annotated")
    b.add_argument(
        "--yardstick",
        action="store_true",
        help="instead of timing: the token-only drafters (pld, suffix) teacher-forced on each prompt's real "
        "continuation (held-out file text, or an edit's known answer) beside the model's own greedy output, "
        "tau per task; the trained heads (eagle, medusa, hydra; those that load for the model) the same way "
        "through the target, which reads the reference text (see docs/bench.md)",
    )
    scale = b.add_mutually_exclusive_group()
    from specdec.models.scale import SCALES

    scale.add_argument(
        "--scale",
        default=None,
        choices=list(SCALES),
        help="instead of the model: one of this published shape with random weights, in its release precision "
        "(bfloat16; --dtype overrides), every method forced along each prompt's real continuation: the speed a "
        "model of that size writing that text gets (tasks complete, long, edit by default; see docs/bench.md)",
    )
    scale.add_argument(
        "--scale-config",
        type=Path,
        default=None,
        metavar="CONFIG_JSON",
        help="as --scale, for the shape in any Hugging Face causal LM config.json",
    )
    from specdec.dllm.cli import add_policy_arguments

    add_policy_arguments(b, several=True)
    b.set_defaults(func=cmd_bench, dtype=None)  # None: "auto", or with --scale the shape's release dtype


def _limit(prompts: list, n: int | None) -> list:
    if n is None:
        return prompts
    taken: dict[str, int] = {}
    kept = []
    for p in prompts:
        if taken.get(p.task, 0) < n:
            taken[p.task] = taken.get(p.task, 0) + 1
            kept.append(p)
    return kept


def _params(args: argparse.Namespace):
    from specdec.cliargs import check_report_arguments
    from specdec.sampling import SamplingParams

    if args.prompts is not None:
        checks.integer("--prompts", args.prompts, 1, error=InputError)
    checks.integer("--warmup", args.warmup, 0, error=InputError)
    checks.integer("--repeats", args.repeats, 1, error=InputError)
    check_report_arguments(args)
    sampled = args.temperature != 0
    default_tokens = QUICK_MAX_NEW_TOKENS if args.quick else MAX_NEW_TOKENS
    params = SamplingParams(  # --max-new-tokens 0 is refused below, as by generate (not taken for "unset")
        max_new_tokens=default_tokens if args.max_new_tokens is None else args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=0 if args.seed is None and sampled else args.seed,
    )
    params.validate()
    return params


def _load_models(args: argparse.Namespace):
    """The target and, for the methods that need one, a draft (the one loading rule: `load_models`)."""
    from specdec.bench.runner import needs_draft, select_methods
    from specdec.models.loading import freeze_heap, load_models

    wanted = select_methods(args.methods, True)
    loaded = load_models(
        args.model,
        args.draft,
        any(needs_draft(m) for m in wanted),
        args.dtype or "auto",
        quantize=args.quantize,
    )
    freeze_heap()  # a full garbage collection must not land in whichever method runs when it triggers
    return loaded.target, loaded.tokenizer, loaded.draft, loaded.draft_name


def _run(args, prompts, model, tokenizer, draft_model, params):
    """Build the methods and run them under one progress bar; returns (result, skipped methods)."""
    from specdec.bench.runner import all_methods, needs_draft, run_methods, select_methods

    names = select_methods(args.methods, draft_model is not None, model)
    result, skipped = run_methods(args, prompts, model, tokenizer, draft_model, params, names)
    if args.methods is None:  # say why the methods left out are missing
        from specdec.bench.methods import GGUF_BASELINE

        for m in all_methods():
            if m in names or m in skipped:
                continue
            skipped[m] = (
                "needs a draft model (--draft PATH)"
                if needs_draft(m) and (names[0] != GGUF_BASELINE or m != "hf-assisted")
                else "needs what a GGUF file does not hold: transformers weights or inner hidden states"
            )
    return result, skipped


def _yardstick(args, prompts, model, tokenizer, max_new_tokens: int) -> int:
    from dataclasses import asdict

    from tqdm import tqdm

    from specdec.bench.yardstick import head_engines, run_yardstick, table

    heads, skipped = head_engines(model, tokenizer)
    for name, reason in skipped.items():
        print(f"specdec bench --yardstick: {name} left out: {reason}", file=sys.stderr)
    bar = tqdm(total=len(prompts), desc="yardstick", unit="prompt", file=sys.stderr, disable=None)
    with bar:
        rows = run_yardstick(
            prompts, model, tokenizer, max_new_tokens, heads=heads, progress=lambda _task: bar.update(1)
        )
    if not rows:
        raise InputError("no prompt has a known real continuation (tasks complete, long and edit have)")
    print(table(rows))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"max_new_tokens": max_new_tokens, "rows": [asdict(r) for r in rows]}, indent=1)
        )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from specdec.bench import report
    from specdec.bench.tasks import load_prompts_file, load_spec_bench, load_suite, suites

    params = _params(args)
    from specdec.dllm.cli import wants_dllm

    if args.tasks is not None and "structured" in args.tasks:  # its own bench: prompts with constraints
        if len(args.tasks) > 1 or args.prompts_file or args.spec_bench or args.scale or args.yardstick:
            raise InputError(
                "--tasks structured runs alone (no other tasks, prompt files, --scale or --yardstick)"
            )
        from specdec.bench import structured, structured_dllm

        if wants_dllm(args.model, args.policies):
            return structured_dllm.run(args, params)
        return structured.run(args, params)
    if wants_dllm(args.model, args.policies):  # a diffusion LM: the speed/quality bench
        if args.quantize:
            raise InputError(
                "--quantize is for autoregressive targets (llama.cpp decodes no diffusion LM here)"
            )
        from specdec.bench import dllm

        return dllm.run(args)
    per_task = args.prompts or (QUICK_PROMPTS if args.quick else None)
    tasks = args.tasks
    scaled = args.scale is not None or args.scale_config is not None
    if tasks is None and args.prompts_file is None and args.spec_bench is None:
        from specdec.bench.scale import SCALE_TASKS

        tasks = list(SCALE_TASKS) if scaled else suites()
    prompts = [p for name in tasks or [] for p in _limit(load_suite(name), per_task)]
    from_file = (
        load_prompts_file(args.prompts_file) if args.prompts_file is not None else []
    )  # before loading

    if scaled:
        from specdec.bench import scale

        if args.spec_bench is not None or args.yardstick or args.draft is not None:
            raise InputError(
                "--scale runs plain prompts with references: no --spec-bench, --yardstick or --draft"
            )
        return scale.run(args, prompts + _limit(from_file, per_task), params, per_task)
    model, tokenizer, draft_model, draft_name = _load_models(args)
    if args.spec_bench is not None:
        prompts += load_spec_bench(args.spec_bench, tokenizer, per_task)
    prompts += _limit(from_file, per_task)
    if not prompts:
        raise InputError("no prompts to run")
    if args.yardstick:
        return _yardstick(args, prompts, model, tokenizer, params.max_new_tokens)
    result, skipped = _run(args, prompts, model, tokenizer, draft_model, params)

    settings = report.settings(args, prompts, result, params, per_task, model)
    env = report.environment(model, args.model, draft_model, draft_name)
    data = report.report(result, env, settings, skipped, sampled=not params.greedy)
    runtimes = ", ".join(f"{name}: {rt}" for name, rt in settings["method_runtimes"].items())
    print(f"target runtime per method: {runtimes}")
    print(report.table(data["results"], data["overall"]))
    for m in result.mismatches:
        print(report.describe_mismatch(m, tokenizer, settings["baseline"]), file=sys.stderr)
    for s in data["slow_runs"]:
        print(
            f"specdec bench: slow run: {s['method']} on {s['task']} prompt {s['index']} ran at "
            f"{s['tokens_per_second']:.1f} tok/s, under a third of its usual pace against the other methods on "
            f"that prompt (their median: {s['prompt_median']:.1f}): the machine or the process stalled "
            "(its timing is suspect)",
            file=sys.stderr,
        )
    if args.json is not None:
        try:
            args.json.write_text(json.dumps(data, indent=1))
        except OSError as e:
            raise InputError(f"cannot write {str(args.json)!r}: {e.strerror or e}") from None
    if args.plot is not None:
        report.plot(data["results"] + data["overall"], args.plot, settings["baseline"])
    failures = [m for m in result.mismatches if not m.numerical_tie]
    ties = len(result.mismatches) - len(failures)
    if ties:
        gap = settings["numerical_tie_gap"]
        print(
            f"specdec bench: {ties} difference(s) at numerical ties (top-2 gap < {gap:g}), listed above",
            file=sys.stderr,
        )
    if failures:
        print(
            f"specdec bench: LOSSLESS CHECK FAILED: {len(failures)} output(s) differ from {settings['baseline']}'s "
            "(listed above)",
            file=sys.stderr,
        )
        return 1
    return 0
