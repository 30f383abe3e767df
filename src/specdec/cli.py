"""`specdec` command line. Every user mistake ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from specdec.errors import InputError

PROMPT_LINE_KEYS = {"prompt", "max_new_tokens", "temperature", "top_k", "top_p", "seed", "stop", "kind"}


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (its default also prints the usage block first)."""

    def error(self, message: str):
        self.exit(2, f"specdec: error: {message} (see '{self.prog} --help')\n")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads models (generate, bench, serve)."""
    p.add_argument(
        "--model", default="default", help="target model path or hub name (default: the shipped code model)"
    )
    p.add_argument(
        "--draft",
        default=None,
        help="draft model for --method draft ('default' = the shipped draft), or a trained head directory for "
        "--method eagle (default: the shipped head, with the shipped model)",
    )
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "llamacpp", "native", "transformers"],
        help="what runs the target's forwards: 'llamacpp' = llama.cpp over a GGUF conversion (Llama models, the "
        "llamacpp extra; logits only), 'native' = specdec's own fused forward (Llama, Mistral, Qwen2, Qwen3), "
        "'transformers' = the model's own code. Each is checked against transformers at load. 'auto' "
        "(default): the first of those that runs the model (llamacpp only for methods that read no hidden "
        "states), saying in one line why it fell back",
    )
    p.add_argument(
        "--threads", type=positive_int, default=None, help="torch threads, >= 1 (default: torch's choice)"
    )


def add_sampling_arguments(p: argparse.ArgumentParser, max_new_tokens: int | None = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="0 = greedy (default); below 1e-5 is greedy too (too small to sample from, as in vLLM)",
    )
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None)


def read_prompts_file(path: Path) -> list[dict]:
    """Validate the whole file before any generation, naming the offending line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InputError(f"cannot read prompts file {str(path)!r}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise InputError(f"prompts file {str(path)!r} is not UTF-8 text") from None
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise InputError(f'{where}: expected an object with a string "prompt"')
        unknown = sorted(set(row) - PROMPT_LINE_KEYS)
        if unknown:
            raise InputError(f"{where}: unknown key(s) {', '.join(unknown)}")
        rows.append({"line": number, **row})
    if not rows:
        raise InputError(f"prompts file {str(path)!r} holds no prompts")
    return rows


def _row_params(args: argparse.Namespace, row: dict) -> dict:
    params = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop": list(args.stop or []),
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
    if args.prompts_file is not None:
        rows = read_prompts_file(args.prompts_file)
    else:
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        rows = [{"line": None, "prompt": prompt}]
    for row in rows:  # check every line's parameters before spending time on the model
        try:
            sampling_params(**_row_params(args, row))
        except (InputError, TypeError) as e:
            where = f"{args.prompts_file}:{row['line']}: " if row["line"] else ""
            raise InputError(f"{where}{e}") from None

    with verbose_logging(args.verbose):
        return _generate(args, rows)


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
        args.model, draft=args.draft, method=args.method, dtype=args.dtype, runtime=args.runtime
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
    g.add_argument("prompt", nargs="?", help="the prompt text, or '-' to read it from stdin")
    add_model_arguments(g)
    g.add_argument(
        "--method",
        default=None,
        help=f"one of: {', '.join(methods())} (default: auto, which picks among them every step)",
    )
    add_sampling_arguments(g)
    g.add_argument("--stop", action="append", help="stop string (repeatable); the text is cut before it")
    g.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt instead of streaming"
    )
    g.add_argument("--prompts-file", type=Path, default=None, help='JSONL, one {"prompt": ...} per line')
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
