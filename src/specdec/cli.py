"""`specdec` command line. Every user mistake ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from specdec.cliargs import (
    add_constraint_arguments,
    add_model_arguments,
    add_sampling_arguments,
    constraint_from_args,
    read_prompts_file,
)
from specdec.errors import InputError
from specdec.text import check_text, decode_utf8


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (its default also prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"specdec: error: {message} (see '{self.prog} --help')\n")

    def _get_values(self, action, arg_strings):
        # argparse (before Python 3.13) drops a '--' value as if it ended the options, even in --stop=--,
        # leaving no value: an option's one value '--' is kept (a separate '--' still ends the options)
        if action.option_strings and action.nargs is None and arg_strings == ["--"]:
            value = self._get_value(action, "--")
            self._check_value(action, value)
            return value
        return super()._get_values(action, arg_strings)


def _row_params(args: argparse.Namespace, row: dict) -> dict:
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": list(args.stop or []),
        "constraint": getattr(args, "constraint", None),
    }
    for key in ("max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop"):
        if key in row:
            params[key] = [row[key]] if key == "stop" and isinstance(row[key], str) else row[key]
    return params


def cmd_generate(args: argparse.Namespace) -> int:
    from specdec.api import sampling_params

    if args.prompts_file is None and args.prompt is None:
        raise InputError("give a prompt (argument, or '-' to read stdin) or --prompts-file")
    if args.prompts_file is not None and args.prompt is not None:
        raise InputError("give either a prompt or --prompts-file, not both")
    args.constraint = constraint_from_args(args)
    if args.prompts_file is not None:
        rows = read_prompts_file(args.prompts_file)
    else:
        prompt = read_stdin() if args.prompt == "-" else args.prompt
        rows = [{"line": None, "prompt": prompt}]
    for row in rows:  # check every line's prompt and parameters before spending time on the model
        try:
            check_text(row["prompt"])
            params = sampling_params(**_row_params(args, row))
            for stop in params.stop:
                check_text(stop, "a stop string")
        except (InputError, TypeError) as e:
            where = f"{args.prompts_file}:{row['line']}: " if row["line"] else ""
            raise InputError(f"{where}{e}") from None

    with verbose_logging(args.verbose):
        return _generate(args, rows)


def read_stdin() -> str:
    """The prompt on stdin, as bytes decoded here: a BOM is dropped and a byte that is not UTF-8 is one line
    (the text layer would keep the BOM as text, and fail or escape the byte by the locale)."""
    stream = getattr(sys.stdin, "buffer", None)
    if stream is None:  # a text stream with no bytes under it (a test's StringIO)
        return sys.stdin.read().removeprefix("\ufeff")
    return decode_utf8(stream.read(), "the prompt on stdin")


@contextlib.contextmanager
def verbose_logging(enabled: bool):
    """--verbose: specdec's runtime and auto loggers at DEBUG on stderr, for this command only."""
    if not enabled:
        yield
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    loggers = [logging.getLogger(name) for name in ("specdec.auto", "specdec.runtime")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)


def _decoder(args: argparse.Namespace):
    """A SpecDecoder, or for a block-diffusion model (or a --policy) a DllmDecoder."""
    from specdec.api import SpecDecoder
    from specdec.dllm.cli import engine_options, policy_options, wants_dllm

    if wants_dllm(args.model, args.policy):
        if args.quantize:
            raise InputError(
                "--quantize is for autoregressive targets (llama.cpp decodes no diffusion LM here)"
            )
        from specdec.dllm.api import DEFAULT_POLICY, DllmDecoder

        if args.method is not None or args.draft is not None:
            raise InputError(
                "--method and --draft are for autoregressive models; a diffusion LM decodes with --policy"
            )
        return DllmDecoder.from_pretrained(
            args.model,
            policy=args.policy or DEFAULT_POLICY,
            dtype=args.dtype,
            **engine_options(args),
            **policy_options(args),
        )
    given = sorted(policy_options(args))
    if given:
        raise InputError(
            f"--{given[0].replace('_', '-')} is a diffusion-LM policy setting (use it with --policy)"
        )
    decoder = SpecDecoder.from_pretrained(
        args.model,
        draft=args.draft,
        method=args.method,
        dtype=args.dtype,
        runtime=args.runtime,
        layer_ids_from=args.layer_ids_from,
        quantize=args.quantize,
    )
    if args.verbose:
        print(f"specdec: target runtime {decoder.engine.runtime.name}", file=sys.stderr)
    return decoder


def _generate(args: argparse.Namespace, rows: list[dict]) -> int:
    decoder = _decoder(args)
    as_json = args.json or args.prompts_file is not None
    for row in rows:
        where = f"{args.prompts_file}:{row['line']}: " if row["line"] else ""
        try:
            stream = decoder.stream(row["prompt"], **_row_params(args, row))
            if as_json:
                for _ in stream:
                    pass
            else:
                for delta in stream:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
        except InputError as e:
            raise InputError(f"{where}{e}") from None
        result = stream.result
        assert result is not None  # set when the iteration above ran to its end
        if as_json:
            stats = result.stats.to_dict()
            print(
                json.dumps({"token_ids": result.token_ids, "text": result.text, "stats": stats}), flush=True
            )
        else:
            sys.stdout.write("\n")
            s = result.stats
            print(
                f"[{_label(args, decoder)}] {s.new_tokens} tokens in {s.wall_seconds:.2f}s "
                f"({s.tokens_per_second:.1f} tok/s), {s.target_forwards} target forwards, "
                f"{'tokens/forward' if hasattr(decoder, 'policy') else 'tau'} {s.mean_accepted_tokens:.2f}, "
                f"finish: {s.finish_reason}",
                file=sys.stderr,
            )
        if result.stats.grammar_complete is False:
            print(
                f"specdec: {where}the output stopped at --max-new-tokens before the constraint was complete "
                "(finish_reason length): it is a prefix of a valid output, not a whole one",
                file=sys.stderr,
            )
    return 0


def _label(args: argparse.Namespace, decoder) -> str:
    policy = getattr(decoder, "policy", None)
    return f"dllm {policy.name}" if policy is not None else args.method or decoder.drafter.name


def cmd_train_lm(args: argparse.Namespace) -> int:
    from specdec.train.cli import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    from specdec.drafters import methods

    parser = Parser(prog="specdec", description="Lossless speculative decoding for HF causal LMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="generate text (streams to stdout; --json for machine-readable output)"
    )
    g.add_argument(
        "prompt",
        nargs="?",
        help="the prompt text, or '-' to read it from stdin; UTF-8 (a leading BOM is dropped; bytes that are "
        "not UTF-8 are refused, not replaced)",
    )
    add_model_arguments(g)
    from specdec.heads import layer_ids

    layer_ids.add_argument(g)  # --layer-ids-from: how a --draft EAGLE-3 head's layer ids are numbered
    g.add_argument(
        "--method",
        default=None,
        help=f"one of: {', '.join(methods())} (default: auto, which picks among them every step)",
    )
    add_sampling_arguments(g)
    add_constraint_arguments(g)
    g.add_argument(
        "--stop",
        action="append",
        help="stop string (repeatable); the text is cut before it. One starting with '-' goes as --stop=VALUE "
        "(e.g. --stop=--)",
    )
    g.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt instead of streaming"
    )
    g.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help='JSONL in UTF-8 (a leading BOM is dropped), one {"prompt": ...} per line',
    )
    g.add_argument(
        "--verbose",
        action="store_true",
        help="on stderr: the target runtime chosen and, for --method auto, every step's choice (which members "
        "ran, how many nodes were verified, from whom, the expected acceptance)",
    )
    from specdec.dllm.cli import add_policy_arguments

    add_policy_arguments(g)
    g.set_defaults(func=cmd_generate)

    from specdec.train.cli import add_arguments as add_train_arguments

    t = sub.add_parser("train-lm", help="train the shipped code-model pair (resumable)")
    add_train_arguments(t)
    t.set_defaults(func=cmd_train_lm)

    # Both register without their extras (FastAPI/uvicorn, matplotlib): the base install must build this
    # parser. `serve` and `bench --plot` check for their extra when run and name it in one line.
    from specdec.bench.cli import register as register_bench
    from specdec.bench.serving import register as register_bench_serve
    from specdec.server.cli import register as register_serve

    register_bench(sub)
    register_bench_serve(sub)
    register_serve(sub)
    from specdec.heads.export import register as register_export_drafter
    from specdec.train.drafter import register as register_train_drafter

    register_train_drafter(sub)
    from specdec.train.dllm import register as register_train_dllm

    register_train_dllm(sub)
    register_export_drafter(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad argument (2, already reported): a status, as below
        return int(e.code or 0)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars are noise on a command line
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except InputError as e:
        print(f"specdec: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specdec: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
