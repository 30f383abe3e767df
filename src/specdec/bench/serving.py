"""`specdec bench-serve`: the real server over loopback with N concurrent clients, against transformers' own
batched `generate()` on the same prompts.

For each server configuration a `specdec serve` subprocess is started (so clients and server do not share one
interpreter lock), warmed up, then driven at each concurrency N by N client threads that stream completions
until the same R requests are done. Reported per configuration and N: total completion tokens / wall time, per-request
latency (p50, p95) and time to the first text chunk (p50, p95). transformers' baseline runs in this process:
the same requests in batches of N through `model.generate` (left padding), each request's latency being its
batch's time (it does not stream). Greedy only: every response is checked against the one-at-a-time server's
answer to the same prompt (which the server tests prove equal to `generate()`), and mismatches are counted.
"""

from __future__ import annotations

import json
import queue
import re
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import specdec.checks as checks
from specdec.bench.serving_workloads import WORKLOADS, Conversation, build
from specdec.cliargs import (
    add_model_argument,
    add_report_arguments,
    add_threads_argument,
    check_report_arguments,
)
from specdec.errors import InputError

# name -> (serve arguments, what it shows)
CONFIGS: dict[str, tuple[list[str], str]] = {
    "speculative": (["--method", "auto"], "auto, batched (--max-batch = the largest N), prefix cache on"),
    "speculative-nocache": (
        ["--method", "auto", "--prefix-cache-mb", "0"],
        "the same without the prefix cache",
    ),
    "plain-batched": (["--method", "vanilla", "--runtime", "native"], "no drafting, batched"),
    "one-at-a-time": (["--method", "auto", "--max-batch", "1"], "auto, one generation at a time"),
}
HF = "hf-batched"  # transformers' generate() in batches of N (no server)
STARTUP_SECONDS = 180.0


@dataclass
class Request:
    prompt: str
    latency: float = 0.0
    first_chunk: float | None = None
    tokens: int = 0
    text: str = ""
    turn: int = 0  # of its conversation (0: the first)
    cached: int = 0  # prompt tokens the server's prefix cache gave
    prompt_tokens: int = 0

    @property
    def per_token(self) -> float | None:
        """Seconds per token after the first (None: a reply of one token, or no text seen)."""
        if self.first_chunk is None or self.tokens < 2:
            return None
        return (self.latency - self.first_chunk) / (self.tokens - 1)


@dataclass
class Row:
    workload: str
    config: str
    concurrency: int
    requests: int
    tokens: int
    seconds: float
    tokens_per_second: float
    latency_p50: float
    latency_p95: float
    ttft_p50: float | None
    ttft_p95: float | None
    mismatches: int | None  # None: no one-at-a-time answers to check against (that config did not run)
    ttft_p90: float | None = None
    ttft_p99: float | None = None
    tpot_p50: float | None = None
    tpot_p90: float | None = None
    tpot_p99: float | None = None
    later_turn_ttft_p50: float | None = None  # multi-turn: the 2nd and later turns' time to first text
    cached_share: float = 0.0  # prompt tokens served from the prefix cache, of all prompt tokens


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class Server:
    """A `specdec serve` subprocess on a free loopback port."""

    def __init__(self, args: list[str], log: Path) -> None:
        cmd = [sys.executable, "-m", "specdec.cli", "serve", "--port", "0", "--log-level", "warning", *args]
        self.log = log
        with open(log, "w") as err:
            self.proc = subprocess.Popen(cmd, stderr=err, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            found = re.search(r"at (http://\S+/v1)", log.read_text())
            if found:
                self.url = found.group(1)
                return
            if self.proc.poll() is not None:
                raise InputError(f"specdec serve {' '.join(args)} exited: {log.read_text().strip()[-500:]}")
            time.sleep(0.2)
        self.close()
        raise InputError(f"specdec serve {' '.join(args)} did not start within {STARTUP_SECONDS:.0f} s")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _stream_one(client, url: str, request: Request, max_tokens: int) -> None:
    body = {
        "prompt": request.prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    parts: list[str] = []
    with client.stream("POST", f"{url}/completions", json=body) as r:
        if r.status_code != 200:
            raise InputError(f"the server answered {r.status_code}: {r.read().decode()[:300]}")
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                request.tokens = chunk["usage"]["completion_tokens"]
                request.prompt_tokens = chunk["usage"]["prompt_tokens"]
            if chunk.get("specdec"):
                request.cached = chunk["specdec"].get("cached_prompt_tokens", 0)
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if request.first_chunk is None:
                        request.first_chunk = time.perf_counter() - start
                    parts.append(choice["text"])
    request.latency = time.perf_counter() - start
    request.text = "".join(parts)


def drive(
    url: str, conversations: list[Conversation], concurrency: int, max_tokens: int
) -> tuple[list[Request], float]:
    """Run every conversation once (its turns in order, each resending the history and the server's answers),
    `concurrency` clients at a time; returns the requests (by conversation, then turn) and the wall time from
    the first send to the last answer."""
    import httpx

    done: list[list[Request]] = [[] for _ in conversations]
    todo: queue.Queue[int] = queue.Queue()
    for c in range(len(conversations)):
        todo.put(c)
    errors: list[BaseException] = []

    def client_thread() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    c = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    prompt = conversations[c].opening
                    for turn, follow_up in enumerate(["", *conversations[c].follow_ups]):
                        if turn:
                            prompt = prompt + done[c][-1].text + follow_up
                        request = Request(prompt, turn=turn)
                        _stream_one(client, url, request, max_tokens)
                        done[c].append(request)
                except BaseException as e:  # noqa: BLE001 - reported once all threads stopped
                    errors.append(e)
                    return

    threads = [threading.Thread(target=client_thread) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    if errors:
        raise InputError(f"a client failed: {errors[0]}")
    return [r for turns in done for r in turns], seconds


def hf_batched(model, tokenizer, prompts: list[str], concurrency: int, max_tokens: int):
    """transformers' generate(), greedy, in batches of `concurrency` prompts (left padding)."""
    import torch

    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    requests, total = [], 0.0
    try:
        for i in range(0, len(prompts), concurrency):
            batch = prompts[i : i + concurrency]
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            start = time.perf_counter()
            with torch.inference_mode():
                out = model.generate(
                    **enc,
                    max_new_tokens=max_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                )
            seconds = time.perf_counter() - start
            total += seconds
            for row, prompt in zip(out[:, enc["input_ids"].shape[1] :], batch, strict=True):
                ids = row.tolist()
                eos = tokenizer.eos_token_id
                if eos in ids:
                    ids = ids[: ids.index(eos) + 1]
                requests.append(
                    Request(prompt, seconds, None, len(ids), tokenizer.decode(ids, skip_special_tokens=True))
                )
    finally:
        tokenizer.padding_side, tokenizer.pad_token = side, pad
    return requests, total


def summarize(
    workload: str, config: str, n: int, requests: list[Request], seconds: float, reference: dict
) -> Row:
    tokens = sum(r.tokens for r in requests)
    latencies = [r.latency for r in requests]
    firsts = [r.first_chunk for r in requests if r.first_chunk is not None]
    later = [r.first_chunk for r in requests if r.first_chunk is not None and r.turn > 0]
    per_token = [t for t in (r.per_token for r in requests) if t is not None]
    mismatches = (
        sum(1 for r in requests if r.prompt in reference and r.text != reference[r.prompt])
        if reference
        else None
    )

    def q(values: list[float], at: float, digits: int = 3) -> float | None:
        return round(_quantile(values, at), digits) if values else None

    return Row(
        workload,
        config,
        n,
        len(requests),
        tokens,
        round(seconds, 3),
        round(tokens / seconds, 1),
        round(_quantile(latencies, 0.5), 3),
        round(_quantile(latencies, 0.95), 3),
        q(firsts, 0.5),
        q(firsts, 0.95),
        mismatches,
        ttft_p90=q(firsts, 0.9),
        ttft_p99=q(firsts, 0.99),
        tpot_p50=q(per_token, 0.5, 4),
        tpot_p90=q(per_token, 0.9, 4),
        tpot_p99=q(per_token, 0.99, 4),
        later_turn_ttft_p50=q(later, 0.5),
        cached_share=round(
            sum(r.cached for r in requests) / max(1, sum(r.prompt_tokens for r in requests)), 3
        ),
    )


def table(rows: list[Row]) -> str:
    def f(x, width: int, digits: int = 3) -> str:
        return f"{'-':>{width}}" if x is None else f"{x:>{width}.{digits}f}"

    lines = [
        f"{'workload':<13} {'config':<19} {'N':>3} {'req':>4} {'tok/s':>7} {'lat p50':>8} {'ttft p50':>9} "
        f"{'ttft p90':>9} {'ttft p99':>9} {'tpot p50':>9} {'tpot p90':>9} {'tpot p99':>9} {'turn2+ ttft':>11} "
        f"{'cached':>6} {'mismatch':>8}"
    ]
    for r in rows:
        lines.append(
            f"{r.workload:<13} {r.config:<19} {r.concurrency:>3} {r.requests:>4} {r.tokens_per_second:>7.1f} "
            f"{r.latency_p50:>8.3f} {f(r.ttft_p50, 9)} {f(r.ttft_p90, 9)} {f(r.ttft_p99, 9)} "
            f"{f(r.tpot_p50, 9, 4)} {f(r.tpot_p90, 9, 4)} {f(r.tpot_p99, 9, 4)} {f(r.later_turn_ttft_p50, 11)} "
            f"{r.cached_share * 100:>5.0f}% {'-' if r.mismatches is None else r.mismatches:>8}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for workload, config in dict.fromkeys((r.workload, r.config) for r in rows):
        points = [
            (r.concurrency, r.tokens_per_second) for r in rows if (r.workload, r.config) == (workload, config)
        ]
        ax.plot(*zip(*points, strict=True), marker="o", label=f"{workload}: {config}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent clients (N)")
    ax.set_ylabel("total completion tokens / s")
    ax.set_title("specdec serve over loopback vs transformers' batched generate()")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def register(subparsers) -> None:
    from specdec.bench.tasks import suites

    p = subparsers.add_parser(
        "bench-serve",
        help="benchmark `specdec serve` with N concurrent clients against transformers' batched generate()",
        description=(
            "Starts `specdec serve` once per configuration (speculative: auto, batched; plain-batched: no "
            "drafting, batched on the native runtime; one-at-a-time: auto with --max-batch 1), drives it over "
            "loopback with N concurrent streaming clients for each N, and runs transformers' generate() in "
            "batches of N on the same prompts. Reports total tokens/s, latency and time-to-first-token "
            "percentiles, and counts greedy responses that differ from the one-at-a-time server's. Greedy only."
        ),
    )
    add_model_argument(p)
    p.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated N (default: 1,2,4,8,16)")
    p.add_argument(
        "--configs",
        default=",".join([*CONFIGS, HF]),
        help=f"comma-separated, from: {', '.join([*CONFIGS, HF])} (default: all)",
    )
    p.add_argument(
        "--tasks",
        default="complete,edit",
        help=f"built-in suites whose prompts are sent, cycled: {', '.join(suites())} (default: complete,edit)",
    )
    p.add_argument(
        "--prompts-file",
        type=Path,
        default=None,
        help='JSONL of {"prompt": ...} to send instead of the built-in suites',
    )
    p.add_argument(
        "--requests",
        type=int,
        default=32,
        help="requests sent at every N, the same prompts for each (at least 2 x the largest N; default 32)",
    )
    p.add_argument("--max-tokens", type=int, default=96, help="max_tokens of every request (default 96)")
    p.add_argument(
        "--workloads",
        default="present",
        help=f"comma-separated, from: {', '.join(WORKLOADS)} (present: independent completions; shared-prefix: "
        "one ~1,000-token text before every request's question; multi-turn: conversations resending their "
        "history; default: present)",
    )
    p.add_argument(
        "--shared-prefix-chars",
        type=int,
        default=4000,
        help="characters of the shared-prefix workload's common text (default 4000: ~1,000 tokens)",
    )
    add_threads_argument(p, help="torch threads of the servers and transformers")
    add_report_arguments(p, "write every row and the settings", "throughput against N")
    p.set_defaults(func=run)


def _positive_list(text: str, what: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise InputError(f"{what} must be comma-separated integers (got {text!r})") from None
    if not values or min(values) < 1:
        raise InputError(f"{what} must be integers >= 1 (got {text!r})")
    return sorted(set(values))


def run(args) -> int:
    import tempfile

    concurrency, configs, workloads = check_settings(args)
    pool = prompt_pool(args)
    # the same requests at every N (rows compare across N), at least two per client at the largest N; texts
    # tagged by workload and N alike in every config, so answers compare prompt by prompt
    count = max(args.requests, 2 * max(concurrency))
    shared = shared_text(args.shared_prefix_chars)
    plans = {(w, n): build(w, pool, shared, count, f"{w}-{n}") for w in workloads for n in concurrency}
    rows: list[Row] = []
    reference: dict[str, str] = {}
    # one-at-a-time first: its answers are the reference the others are checked against
    order = sorted(configs, key=lambda c: c != "one-at-a-time")
    with tempfile.TemporaryDirectory() as tmp:
        for config in order:
            if config != HF:
                rows += serve_rows(args, config, Path(tmp), pool, plans, reference)
    if HF in configs:
        rows += hf_rows(args, pool, plans, reference)
    rows.sort(key=lambda r: (workloads.index(r.workload), configs.index(r.config), r.concurrency))
    print(table(rows))
    if args.json is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
        args.json.write_text(json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=1))
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


def shared_text(chars: int) -> str:
    """The shared-prefix workload's common text: the start of the first long held-out file (4,000
    characters by default: about 1,000 tokens of the shipped tokenizer)."""
    from specdec.bench.tasks import load_suite

    text = next(p.text for p in load_suite("long") if p.text)
    return text[:chars]


def check_settings(args) -> tuple[list[int], list[str], list[str]]:
    """(the concurrencies, the configs, the workloads) asked for, and every other setting and extra checked
    before any server starts."""
    concurrency = _positive_list(args.concurrency, "--concurrency")
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if not workloads or any(w not in WORKLOADS for w in workloads):
        bad = next((w for w in workloads if w not in WORKLOADS), "(none)")
        raise InputError(f"unknown workload {bad!r} (choose from {', '.join(WORKLOADS)})")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS and c != HF]
    if unknown or not configs:
        raise InputError(
            f"unknown config {unknown[0] if unknown else '(none)'!r} (choose from {', '.join([*CONFIGS, HF])})"
        )
    checks.integer("--requests", args.requests, 1, error=InputError)
    checks.integer("--max-tokens", args.max_tokens, 1, error=InputError)
    checks.integer("--shared-prefix-chars", args.shared_prefix_chars, 1, error=InputError)
    check_report_arguments(args)
    try:
        import fastapi  # noqa: F401  (the servers it starts)
        import httpx  # noqa: F401  (its clients)
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise InputError(
            f"bench-serve needs the server extra ({e.name} is not installed): pip install 'specdec[server]'"
        ) from None
    return concurrency, configs, list(dict.fromkeys(workloads))


def prompt_pool(args) -> list[str]:
    """The prompt texts the requests cycle through: the prompts file's, else the tasks' suites'."""
    from specdec.bench.tasks import load_prompts_file, load_suite

    if args.prompts_file is not None:
        pool = [p.text for p in load_prompts_file(args.prompts_file) if p.text]
    else:
        pool = [p.text for task in args.tasks.split(",") for p in load_suite(task.strip()) if p.text]
    if not pool:
        raise InputError("no prompts to send")
    return pool


def serve_rows(
    args, config: str, tmp: Path, pool: list[str], plans: dict, reference: dict[str, str]
) -> list[Row]:
    """One server config driven with every workload at every N (`plans`: (workload, N) -> conversations);
    one-at-a-time's answers go to `reference`."""
    largest = max(n for _, n in plans)
    common = ["--model", args.model, "--max-tokens", str(args.max_tokens)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    extra, _ = CONFIGS[config]
    batch = [] if "--max-batch" in extra else ["--max-batch", str(largest)]
    print(f"bench-serve: starting {config} ({' '.join(extra + batch)})", file=sys.stderr)
    server = Server(common + extra + batch, tmp / f"{config}.log")
    rows = []
    try:
        warm = build("present", pool[:2], "", 2, "warm-up")
        drive(server.url, warm, min(2, largest), args.max_tokens)  # untimed
        for (workload, n), conversations in plans.items():
            requests, seconds = drive(server.url, conversations, n, args.max_tokens)
            if config == "one-at-a-time":
                for r in requests:
                    reference.setdefault(r.prompt, r.text)
            rows.append(summarize(workload, config, n, requests, seconds, reference))
            print(table(rows[-1:]).splitlines()[1], file=sys.stderr)
    finally:
        server.close()
    return rows


def hf_rows(args, pool: list[str], plans: dict, reference: dict[str, str]) -> list[Row]:
    """transformers' batched generate() in batches of every N, in this process (a conversation's turns in
    order: a batch of N conversations advances a turn per batched call)."""
    import torch

    from specdec.models.loading import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    hf_batched(model, tokenizer, pool[:2], 2, 8)  # warm-up
    rows = []
    for (workload, n), conversations in plans.items():
        requests: list[Request] = []
        seconds = 0.0
        for start in range(0, len(conversations), n):
            group = conversations[start : start + n]
            prompts = [c.opening for c in group]
            done: list[Request] = []
            for turn in range(1 + len(group[0].follow_ups)):
                if turn:
                    prompts = [
                        p + r.text + c.follow_ups[turn - 1]
                        for p, r, c in zip(prompts, done, group, strict=True)
                    ]
                done, took = hf_batched(model, tokenizer, prompts, n, args.max_tokens)
                for r in done:
                    r.turn = turn
                requests += done
                seconds += took
        rows.append(summarize(workload, HF, n, requests, seconds, reference))
        print(table(rows[-1:]).splitlines()[1], file=sys.stderr)
    return rows
