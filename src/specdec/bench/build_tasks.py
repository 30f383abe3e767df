"""Build the bench task suites (`tasks/*.jsonl`) from held-out Python files only, deterministically.

    python -m specdec.bench.build_tasks --manifest corpus_manifest.json --tokenizer MODEL_DIR

Only files listed under "held_out_files" in the training corpus manifest AND held out by
`specdec.train.corpus.is_held_out` are read, so no prompt comes from a file the shipped models trained on.
Names ("stdlib/json/encoder.py") map to this machine's files through `default_roots()`. Candidates are
ordered by a hash of (task, file, line), not by file order, so a suite spreads over many files; the same
manifest, installation and tokenizer always give byte-identical output.

Each line: {"prompt": ..., "kind": task, "source": held-out file name}, and "reference" where the text that
really follows the prompt is known: the file's next REFERENCE_CHARS characters (complete, long) or the edit's
answer (`specdec.bench.yardstick.real_continuation`). `specdec bench --scale` forces acceptance along it.
`--references-only` adds references to the suites already written, reading the held-out files from the
installation plus any `--root LABEL=DIR` (for files whose package is not installed here). Tasks:
  complete   a file prefix ending right after a function's signature and docstring;
  edit       a whole function, then a comment asking for it again with one small change, then the new `def`;
  long       a 1024-1792-token file prefix (room for 256 new tokens in a 2048-position context);
  multiturn  a request, the function as the first answer, then a second request for a variant of it.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sys
import textwrap
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from specdec.train.corpus import default_roots, is_held_out

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
PROMPTS_PER_TASK = {"complete": 12, "edit": 12, "long": 10, "multiturn": 12}
PER_FILE = 2  # at most this many prompts of one task from one file
COMPLETE_TOKENS = (48, 1024)  # prompt length bounds
FUNCTION_TOKENS = (60, 400)  # the function copied by edit / multiturn
LONG_TOKENS = (1024, 1792)
REFERENCE_CHARS = 2048  # of real continuation kept: more than 256 new tokens of the shipped tokenizer


@dataclass(frozen=True)
class Source:
    name: str  # held-out name, e.g. "stdlib/json/encoder.py"
    text: str
    lines: list[str]  # keepends=True
    tree: ast.Module


def _key(*parts: object) -> str:
    return hashlib.sha1(":".join(map(str, parts)).encode()).hexdigest()


def load_sources(manifest: dict, roots: dict[str, str]) -> list[Source]:
    """The manifest's held-out files that exist here and parse, sorted by name."""
    sources = []
    for name in sorted(manifest["held_out_files"]):
        if not is_held_out(name):
            raise SystemExit(f"{name} is listed as held out but is_held_out() disagrees; wrong manifest?")
        label, _, rel = name.partition("/")
        if label not in roots:
            continue
        path = Path(roots[label]) / rel
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
            continue
        sources.append(Source(name, text, text.splitlines(keepends=True), tree))
    return sources


def _functions(src: Source) -> list[ast.FunctionDef | ast.AsyncFunctionDef]:
    nodes = [n for n in ast.walk(src.tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    return sorted(nodes, key=lambda n: n.lineno)


def _has_docstring(fn) -> bool:
    first = fn.body[0]
    return (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )


def _function_source(src: Source, fn) -> str:
    return textwrap.dedent("".join(src.lines[fn.lineno - 1 : fn.end_lineno]))


def _def_keyword(fn) -> str:
    return "async def" if isinstance(fn, ast.AsyncFunctionDef) else "def"


class Builder:
    def __init__(self, sources: list[Source], count_tokens: Callable[[str], int]) -> None:
        self.sources = sources
        self.count = count_tokens
        self.used: set[tuple[str, int]] = set()  # (file, line) of functions already in a prompt

    def _pick(self, task: str, make: Callable, whole_files: bool = False) -> list[dict]:
        """Candidates (functions, or whole files) in hash order, at most PER_FILE per file, each function used
        once over all tasks. `make(source, function or None, draw)` returns a prompt or None (unsuitable);
        `draw` is the candidate's hash as an int, a deterministic choice of variant or length."""
        candidates: list[tuple[str, Source, ast.FunctionDef | ast.AsyncFunctionDef | None]]
        if whole_files:
            candidates = [(_key(task, s.name), s, None) for s in self.sources]
        else:
            candidates = [
                (_key(task, s.name, fn.lineno), s, fn) for s in self.sources for fn in _functions(s)
            ]
        rows: list[dict] = []
        per_file: dict[str, int] = {}
        for key, src, fn in sorted(candidates, key=lambda c: c[0]):
            if len(rows) == PROMPTS_PER_TASK[task]:
                break
            spot = (src.name, fn.lineno if fn else 0)
            if per_file.get(src.name, 0) >= PER_FILE or spot in self.used:
                continue
            prompt = make(src, fn, int(key, 16))
            if prompt is None:
                continue
            self.used.add(spot)
            per_file[src.name] = per_file.get(src.name, 0) + 1
            rows.append({"prompt": prompt, "kind": task, "source": src.name})
        return rows

    def _copyable(self, src: Source, fn) -> bool:
        """A function worth copying: undecorated, 6-40 lines, a few hundred tokens."""
        lines = fn.end_lineno - fn.lineno + 1
        if fn.decorator_list or not 6 <= lines <= 40:
            return False
        lo, hi = FUNCTION_TOKENS
        return lo <= self.count(_function_source(src, fn)) <= hi

    def complete(self) -> list[dict]:
        def make(src: Source, fn, draw: int) -> str | None:
            if (
                not _has_docstring(fn) or len(fn.body) < 3
            ):  # the docstring and at least two statements to continue with
                return None
            prompt = "".join(src.lines[: fn.body[0].end_lineno])
            lo, hi = COMPLETE_TOKENS
            return prompt if lo <= self.count(prompt) <= hi else None

        return self._pick("complete", make)

    def edit(self) -> list[dict]:
        def make(src: Source, fn, draw: int) -> str | None:
            if not self._copyable(src, fn):
                return None
            code = _function_source(src, fn)
            name, kw = fn.name, _def_keyword(fn)
            params = [a.arg for a in fn.args.posonlyargs + fn.args.args + fn.args.kwonlyargs]
            used = {n.id for stmt in fn.body for n in ast.walk(stmt) if isinstance(n, ast.Name)}
            params = [p for p in params if p not in ("self", "cls") and p in used]
            if draw % 2 == 0 or not params:
                request = f"# The function above again, unchanged except that it is renamed to {name}_v2:"
                start = f"{kw} {name}_v2("
            else:
                p = params[0]
                request = f"# The function above again, with the parameter `{p}` renamed to `{p}_value`:"
                start = f"{kw} {name}("
            return f"{code}\n\n{request}\n{start}"

        return self._pick("edit", make)

    def long(self) -> list[dict]:
        def make(src: Source, fn, draw: int) -> str | None:
            lo, hi = LONG_TOKENS
            budget = lo + draw % (hi - lo + 1)
            if sum(1 for _ in _functions(src)) < 5:  # data tables and config scripts are not code to continue
                return None
            total, end = 0, 0
            for i, line in enumerate(src.lines):  # a newline is its own token: lines tokenise independently
                n = self.count(line)
                if total + n > budget:
                    break
                total, end = total + n, i + 1
            prompt = "".join(src.lines[:end])
            return prompt if lo <= self.count(prompt) <= hi else None

        return self._pick("long", make, whole_files=True)

    def multiturn(self) -> list[dict]:
        variants = [
            ("checked", "checks its arguments first and raises ValueError on bad input"),
            ("kw", "takes all of its arguments as keyword-only arguments"),
            ("logged", "logs its arguments with logging.debug before doing the same work"),
        ]

        def make(src: Source, fn, draw: int) -> str | None:
            if not _has_docstring(fn) or not self._copyable(src, fn):
                return None
            doc = ast.get_docstring(fn)
            assert doc is not None  # _has_docstring(fn)
            summary = doc.strip().splitlines()[0].strip()
            if len(summary) < 10:
                return None
            suffix, what = variants[draw % len(variants)]
            kw, name = _def_keyword(fn), fn.name
            return (
                f"# User: write a Python function `{name}`. {summary}\n"
                f"# Assistant:\n{_function_source(src, fn)}\n"
                f"# User: now write a variant `{name}_{suffix}` that {what}; everything else stays the same.\n"
                f"# Assistant:\n{kw} {name}_{suffix}("
            )

        return self._pick("multiturn", make)


def build(manifest: dict, tokenizer, roots: dict[str, str] | None = None) -> dict[str, list[dict]]:
    def count(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    builder = Builder(load_sources(manifest, roots or default_roots()), count)
    return {task: getattr(builder, task)() for task in PROMPTS_PER_TASK}  # fixed order: `used` is shared


def add_references(suites: dict[str, list[dict]], roots: dict[str, str]) -> int:
    """Set each row's "reference" where its real continuation is known here; returns how many rows have one."""
    from specdec.bench.yardstick import real_continuation

    found = 0
    for task, rows in suites.items():
        for row in rows:
            if "reference" not in row:
                text = real_continuation(task, row["prompt"], row["source"], roots)
                if text:
                    row["reference"] = text[:REFERENCE_CHARS]
            found += "reference" in row
    return found


def read_suites(folder: Path) -> dict[str, list[dict]]:
    return {
        task: [
            json.loads(line) for line in (folder / f"{task}.jsonl").read_text(encoding="utf-8").splitlines()
        ]
        for task in PROMPTS_PER_TASK
        if (folder / f"{task}.jsonl").exists()
    }


def write(suites: dict[str, list[dict]], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for task, rows in suites.items():
        text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        (out_dir / f"{task}.jsonl").write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    from specdec.models.shipped import SHIPPED_DIR

    p = argparse.ArgumentParser(
        prog="python -m specdec.bench.build_tasks", description=__doc__.splitlines()[0]
    )
    p.add_argument(
        "--manifest",
        type=Path,
        default=SHIPPED_DIR / "corpus_manifest.json",
        help="training corpus manifest with 'held_out_files' (default: the shipped models' copy)",
    )
    p.add_argument(
        "--tokenizer",
        default=str(SHIPPED_DIR / "target"),
        help="tokenizer that measures prompt lengths (default: the shipped target's)",
    )
    p.add_argument("--out", type=Path, default=TASKS_DIR)
    p.add_argument(
        "--references-only",
        action="store_true",
        help="add references to the suites in --out instead of building them",
    )
    p.add_argument(
        "--root",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="also read held-out files named LABEL/... from DIR (repeatable)",
    )
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    roots = [r.partition("=") for r in args.root]
    if any(not label or not folder for label, _, folder in roots):
        p.error("--root takes LABEL=DIR")
    if args.references_only:
        suites = read_suites(args.out)
        found = 0
        for extra in [default_roots()] + [{label: folder} for label, _, folder in roots]:
            found = add_references(suites, extra)
        write(suites, args.out)
        print(f"{found} prompts have a reference", file=sys.stderr)
        return 0
    if not args.manifest.exists():
        p.error(f"no manifest at {args.manifest}; pass --manifest")
    manifest = json.loads(args.manifest.read_text())
    suites = build(manifest, AutoTokenizer.from_pretrained(args.tokenizer))
    add_references(suites, default_roots())
    write(suites, args.out)
    for task, rows in suites.items():
        print(f"{task}: {len(rows)} prompts from {len({r['source'] for r in rows})} files", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
