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
from specdec.cliargs import (
    add_model_argument,
    add_report_arguments,
    add_threads_argument,
    check_report_arguments,
)
from specdec.errors import InputError

# name -> (serve arguments, what it shows)
CONFIGS: dict[str, tuple[list[str], str]] = {
    "speculative": (["--method", "auto"], "auto, batched (--max-batch = the largest N)"),
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


@dataclass
class Row:
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
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    if request.first_chunk is None:
                        request.first_chunk = time.perf_counter() - start
                    parts.append(choice["text"])
    request.latency = time.perf_counter() - start
    request.text = "".join(parts)


def drive(url: str, prompts: list[str], concurrency: int, max_tokens: int) -> tuple[list[Request], float]:
    """Send every prompt once, `concurrency` at a time; returns the requests (in prompt order) and the wall
    time from the first send to the last answer."""
    import httpx

    requests = [Request(p) for p in prompts]
    todo: queue.Queue[Request] = queue.Queue()
    for r in requests:
        todo.put(r)
    errors: list[BaseException] = []

    def client_thread() -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                try:
                    r = todo.get_nowait()
                except queue.Empty:
                    return
                try:
                    _stream_one(client, url, r, max_tokens)
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
    return requests, seconds


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


def summarize(config: str, n: int, requests: list[Request], seconds: float, reference: dict) -> Row:
    tokens = sum(r.tokens for r in requests)
    latencies = [r.latency for r in requests]
    firsts = [r.first_chunk for r in requests if r.first_chunk is not None]
    mismatches = (
        sum(1 for r in requests if r.prompt in reference and r.text != reference[r.prompt])
        if reference
        else None
    )
    return Row(
        config,
        n,
        len(requests),
        tokens,
        round(seconds, 3),
        round(tokens / seconds, 1),
        round(_quantile(latencies, 0.5), 3),
        round(_quantile(latencies, 0.95), 3),
        round(_quantile(firsts, 0.5), 3) if firsts else None,
        round(_quantile(firsts, 0.95), 3) if firsts else None,
        mismatches,
    )


def table(rows: list[Row]) -> str:
    lines = [
        f"{'config':<14} {'N':>3} {'req':>4} {'tok/s':>7} {'lat p50':>8} {'lat p95':>8} {'ttft p50':>9} "
        f"{'ttft p95':>9} {'mismatch':>8}"
    ]
    for r in rows:
        ttft = f"{r.ttft_p50:>9.3f} {r.ttft_p95:>9.3f}" if r.ttft_p50 is not None else f"{'-':>9} {'-':>9}"
        lines.append(
            f"{r.config:<14} {r.concurrency:>3} {r.requests:>4} {r.tokens_per_second:>7.1f} "
            f"{r.latency_p50:>8.3f} {r.latency_p95:>8.3f} {ttft} {'-' if r.mismatches is None else r.mismatches:>8}"
        )
    return "\n".join(lines)


def plot(rows: list[Row], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for config in dict.fromkeys(r.config for r in rows):
        points = [(r.concurrency, r.tokens_per_second) for r in rows if r.config == config]
        ax.plot(*zip(*points, strict=True), marker="o", label=config)
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

    concurrency, configs = check_settings(args)
    pool = prompt_pool(args)
    largest = max(concurrency)
    # the same requests at every N (rows compare across N), at least two per client at the largest N
    prompts = [pool[i % len(pool)] for i in range(max(args.requests, 2 * largest))]
    rows: list[Row] = []
    reference: dict[str, str] = {}
    # one-at-a-time first: its answers are the reference the others are checked against
    order = sorted(configs, key=lambda c: c != "one-at-a-time")
    with tempfile.TemporaryDirectory() as tmp:
        for config in order:
            if config != HF:
                rows += serve_rows(args, config, Path(tmp), (pool, prompts), concurrency, reference)
    if HF in configs:
        rows += hf_rows(args, pool, prompts, concurrency, reference)
    rows.sort(key=lambda r: (configs.index(r.config), r.concurrency))
    print(table(rows))
    if args.json is not None:
        settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "func"}
        args.json.write_text(json.dumps({"settings": settings, "rows": [asdict(r) for r in rows]}, indent=1))
    if args.plot is not None:
        plot(rows, args.plot)
    return 0


def check_settings(args) -> tuple[list[int], list[str]]:
    """(the concurrencies, the configs) asked for, and every other setting and extra checked before any
    server starts."""
    concurrency = _positive_list(args.concurrency, "--concurrency")
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS and c != HF]
    if unknown or not configs:
        raise InputError(
            f"unknown config {unknown[0] if unknown else '(none)'!r} (choose from {', '.join([*CONFIGS, HF])})"
        )
    checks.integer("--requests", args.requests, 1, error=InputError)
    checks.integer("--max-tokens", args.max_tokens, 1, error=InputError)
    check_report_arguments(args)
    try:
        import fastapi  # noqa: F401  (the servers it starts)
        import httpx  # noqa: F401  (its clients)
        import uvicorn  # noqa: F401
    except ModuleNotFoundError as e:
        raise InputError(
            f"bench-serve needs the server extra ({e.name} is not installed): pip install 'specdec[server]'"
        ) from None
    return concurrency, configs


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
    args,
    config: str,
    tmp: Path,
    texts: tuple[list[str], list[str]],
    concurrency: list[int],
    reference: dict[str, str],
) -> list[Row]:
    """One server config driven at every N (`texts`: the prompt pool, the requests); one-at-a-time's answers
    go to `reference`."""
    pool, prompts = texts
    largest = max(concurrency)
    common = ["--model", args.model, "--max-tokens", str(args.max_tokens)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    extra, _ = CONFIGS[config]
    batch = [] if "--max-batch" in extra else ["--max-batch", str(largest)]
    print(f"bench-serve: starting {config} ({' '.join(extra + batch)})", file=sys.stderr)
    server = Server(common + extra + batch, tmp / f"{config}.log")
    rows = []
    try:
        drive(server.url, pool[:2], min(2, largest), args.max_tokens)  # warm-up (untimed)
        for n in concurrency:
            requests, seconds = drive(server.url, prompts, n, args.max_tokens)
            if config == "one-at-a-time":
                for r in requests:
                    reference.setdefault(r.prompt, r.text)
            rows.append(summarize(config, n, requests, seconds, reference))
            print(table(rows[-1:]).splitlines()[1], file=sys.stderr)
    finally:
        server.close()
    return rows


def hf_rows(
    args, pool: list[str], prompts: list[str], concurrency: list[int], reference: dict[str, str]
) -> list[Row]:
    """transformers' batched generate() in batches of every N, in this process."""
    import torch

    from specdec.models.loading import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_causal_lm(args.model)
    hf_batched(model, tokenizer, pool[:2], 2, 8)  # warm-up
    rows = []
    for n in concurrency:
        requests, seconds = hf_batched(model, tokenizer, prompts, n, args.max_tokens)
        rows.append(summarize(HF, n, requests, seconds, reference))
        print(table(rows[-1:]).splitlines()[1], file=sys.stderr)
    return rows
