"""The command line's shared pieces: the model and sampling options of every command that loads models, their
argparse types, and the prompts file. Imported by every command module (generate, bench, serve, dllm), so it
imports none of them."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import specdec.checks as checks
from specdec.errors import InputError
from specdec.text import decode_utf8

PROMPT_LINE_KEYS = {
    "prompt",
    "max_new_tokens",
    "temperature",
    "top_k",
    "top_p",
    "seed",
    "stop",
    "kind",
    "reference",
}


def integer(minimum: int, maximum: int | None = None, what: str = "an integer") -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum] (no maximum: >= minimum), refused in one line by the
    rule of `checks.integer` (argparse names the option: "argument --port: must be ...")."""
    noun = "" if what == "an integer" else what  # "must be >= 1": the option's name says it is a count

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            expected = f"{what} {checks.bounds(minimum, maximum)}"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        return checks.integer("", value, minimum, maximum, error=argparse.ArgumentTypeError, what=noun)

    return parse


positive_int = integer(1)
non_negative_int = integer(0)
port_number = integer(0, 65535, "a port number")


def add_model_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", default="default", help="target model path or hub name (default: the shipped code model)"
    )


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that loads models (generate, bench, serve)."""
    add_model_argument(p)
    p.add_argument(
        "--draft",
        default=None,
        help="draft model for --method draft ('default' = the shipped draft, which the shipped model drafts "
        "with when none is given), or a trained head directory for --method eagle (default: the shipped head, "
        "with the shipped model)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16", "float64"],
        help="the weights' precision; 'auto' (default): a checkpoint saved in bfloat16 runs in bfloat16 on a "
        "CPU with bf16 units, anything else (and the shipped models) in float32 (bench --scale: the shape's "
        "release precision)",
    )
    p.add_argument(
        "--quantize",
        default=None,
        choices=["q8_0", "q4_k_m"],
        help="run the target as a GGUF file quantized so by llama.cpp (Llama, Mistral, Qwen2, Qwen3; converted "
        "once and cached under ~/.cache/specdec, $SPECDEC_CACHE to move it): outputs are then lossless against "
        "that file's llama.cpp decoding, not the original weights'",
    )
    p.add_argument(
        "--runtime",
        default="auto",
        choices=["auto", "llamacpp", "native", "transformers"],
        help="what runs the target's forwards: 'llamacpp' = llama.cpp over a GGUF conversion (Llama, Mistral, "
        "Qwen2, Qwen3; the llamacpp extra; logits only; the only one for a GGUF file), 'native' = specdec's own fused forward (Llama, Mistral, Qwen2, Qwen3), "
        "'transformers' = the model's own code. Each is checked against transformers at load. 'auto' "
        "(default): the first of those that runs the model (llamacpp only for methods that read no hidden "
        "states), saying in one line why it fell back",
    )
    add_threads_argument(p)


def add_threads_argument(
    p: argparse.ArgumentParser, help: str = "torch threads, >= 1 (default: torch's choice)"
) -> None:
    p.add_argument("--threads", type=positive_int, default=None, help=help)


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


def add_report_arguments(p: argparse.ArgumentParser, json_help: str, plot_help: str) -> None:
    """A benchmark's files, --json OUT and --plot OUT.png (checked by `check_report_arguments`)."""
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help=json_help)
    p.add_argument("--plot", type=Path, default=None, metavar="OUT.png", help=plot_help)


def check_report_arguments(args: argparse.Namespace) -> None:
    """Checked before the benchmark runs, since its files are written only once it is over: each one's
    directory exists, and --plot's matplotlib is installed."""
    for flag, out in (("--json", args.json), ("--plot", args.plot)):
        if out is not None and not out.resolve().parent.is_dir():
            raise InputError(f"cannot write {flag} {str(out)!r}: no such directory")
    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InputError("--plot needs matplotlib (pip install 'specdec[bench]')") from None


def read_prompts_file(path: Path) -> list[dict]:
    """Validate the whole file before any generation, naming the offending line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read prompts file {str(path)!r}: {e.strerror or e}") from None
    lines = decode_utf8(data, f"prompts file {str(path)!r}").splitlines()  # a BOM dropped
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


def add_constraint_arguments(p: argparse.ArgumentParser) -> None:
    """What the output must match (one of them; docs/structured.md): read by `constraint_from_args`."""
    group = p.add_argument_group("structured output (one of)").add_mutually_exclusive_group()
    group.add_argument(
        "--json-schema", metavar="FILE|JSON", help="a JSON Schema the output follows (a file or inline JSON)"
    )
    group.add_argument("--json-object", action="store_true", help="the output is one JSON object (any)")
    group.add_argument("--regex", metavar="PATTERN", help="a regular expression the whole output matches")
    group.add_argument(
        "--grammar",
        metavar="FILE",
        type=Path,
        help="a context-free grammar: Lark (llguidance's dialect), or GBNF for a .gbnf file",
    )
    group.add_argument(
        "--choice", action="append", metavar="TEXT", help="the output is one of these strings (repeatable)"
    )


def constraint_from_args(args: argparse.Namespace):
    """The `Constraint` the flags of `add_constraint_arguments` name, or None; InputError for a missing or
    unreadable file."""
    from specdec.grammar import Constraint

    if getattr(args, "json_schema", None) is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = _read_text(Path(text), "--json-schema")
        return Constraint.json_schema(text)
    if getattr(args, "json_object", False):
        return Constraint.json_object()
    if getattr(args, "regex", None) is not None:
        return Constraint.regex(args.regex)
    if getattr(args, "grammar", None) is not None:
        syntax = "gbnf" if args.grammar.suffix.lower() == ".gbnf" else "lark"
        return Constraint.grammar(_read_text(args.grammar, "--grammar"), syntax)
    if getattr(args, "choice", None):
        return Constraint.choice(args.choice)
    return None


def _read_text(path: Path, flag: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{flag}: no such file: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{flag}: cannot read {path}: {e}") from None
