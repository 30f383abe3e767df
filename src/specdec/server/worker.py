"""One engine thread, off the event loop: the live generations advance together, a step at a time.

Everything runs on this one thread: a model's forward is not safe to run from two threads at once, and the
tokenizer is used only here too (Hugging Face fast tokenizers mutate shared state when called and are not safe
to share across threads). Continuous batching: requests join between steps, in arrival order, up to
`max_batch` live at once; each step, the live generations of a decoder that can batch (`specdec.batch`: the
native runtime, drafters without hidden states) are scored in one shared forward, and every other live
generation advances by one step of its own. Events reach the request's asyncio queue through
`call_soon_threadsafe`; a request that goes away sets `cancelled`, and its generation leaves at the next step,
freeing its row.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

from specdec.api import SpecDecoder, sampling_params
from specdec.errors import ContextLengthError, InputError
from specdec.server.errors import APIError
from specdec.server.metrics import Metrics

log = logging.getLogger("specdec.server")

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # engine's -> OpenAI's


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass(frozen=True)
class Delta:
    text: str


@dataclass(frozen=True)
class Finished:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # OpenAI's: "stop" (EOS or a stop string) or "length"
    stats: dict  # specdec's extension field


@dataclass(frozen=True)
class Failed:
    error: APIError


Event = Started | Delta | Finished | Failed


@dataclass
class Prompt:
    """What the worker turns into token ids (on its own thread) and the limits that apply to it."""

    encode: Callable[[], list[int]]
    param: str  # the request field the prompt came from, for error messages
    max_prompt_tokens: int | None
    max_new_tokens_cap: int  # used when the request gives no max_tokens


class Job:
    """One request's generation. Create it inside the event loop that will read its events."""

    def __init__(self, decoder: SpecDecoder, method: str, prompt: Prompt, params: dict) -> None:
        self.decoder, self.method, self.prompt, self.params = decoder, method, prompt, params
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.submitted = time.perf_counter()

    def cancel(self) -> None:
        self.cancelled.set()

    def emit(self, event: Event) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancelled.set()


class Live:
    """A generation in progress: its job, what it reports on, and how it advances."""

    def __init__(self, job: Job, prompt_tokens: int, queue_seconds: float) -> None:
        self.job, self.prompt_tokens, self.queue_seconds = job, prompt_tokens, queue_seconds
        self.started = False
        self.batch = None  # the `specdec.batch.Batch` it runs in, if any
        self.member = None  # its row there (`specdec.batch.Member`)
        self.steps: Generator | None = None  # its own generator otherwise (`Engine.run`)
        self.first_token: float | None = None  # when its first token was emitted (perf_counter)


@dataclass
class _Batches:
    """One `specdec.batch.Batch` per decoder that can batch (None: it cannot)."""

    max_batch: int
    by_decoder: dict = field(default_factory=dict)

    def get(self, decoder: SpecDecoder):
        from specdec.batch import Batch

        if decoder not in self.by_decoder and not hasattr(
            decoder, "drafter"
        ):  # a diffusion LM: one at a time
            self.by_decoder[decoder] = None
        if decoder not in self.by_decoder:
            try:
                self.by_decoder[decoder] = (
                    Batch(decoder.engine, self.max_batch) if self.max_batch > 1 else None
                )
            except InputError:  # not the native runtime, or a drafter reading hidden states
                self.by_decoder[decoder] = None
        return self.by_decoder[decoder]


class EngineWorker:
    def __init__(self, max_queued: int, max_batch: int = 8, own_thread: bool = True) -> None:
        """`own_thread`: run the engine loop on a thread of its own, started here; False: the caller runs it
        (`run`), as `specdec serve` does on its main thread (see `run`)."""
        self.max_queued, self.max_batch = max_queued, max_batch
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._pending: deque[Job] = deque()  # submitted, not yet started
        self._jobs: set[Job] = set()  # submitted and not yet done
        self._live: list[Live] = []
        self._stopping = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.peak = 0  # most generations live at once so far
        self.metrics = Metrics(
            running=lambda: len(self._live), queued=lambda: max(0, len(self._jobs) - len(self._live))
        )
        if own_thread:
            threading.Thread(target=self._loop, name="specdec-engine", daemon=True).start()

    @property
    def active(self) -> Job | None:
        """The oldest live generation's job (None when idle)."""
        with self._lock:
            return self._live[0].job if self._live else None

    def submit(self, job: Job) -> None:
        with self._lock:
            # max_batch may run together and max_queued more may wait
            if len(self._jobs) >= self.max_batch + self.max_queued:
                raise APIError(
                    503, "the server is busy (too many queued requests); retry later", code="server_busy"
                )
            self._jobs.add(job)
            self._pending.append(job)
            self._wake.notify()

    def snapshot(self) -> dict:
        with self._lock:
            running = len(self._live)
            return {
                "running": running,
                "queued": len(self._jobs) - running,
                "peak_running": self.peak,
                **self.counts,
            }

    def shutdown(self) -> None:
        with self._lock:
            self._stopping = True
            for job in self._jobs:
                job.cancel()
            self._wake.notify()

    # -- the engine thread ---------------------------------------------------------------------------------

    def run(self) -> None:
        """The engine loop on the calling thread, until `shutdown`. Call it from the thread that loaded the
        models: PyTorch's CPU forwards run far slower on a thread other than the one whose OpenMP workers did
        the earlier work (docs/serve.md has the measurement), so `specdec serve` keeps the engine on its main
        thread and serves HTTP from another."""
        self._loop()

    def _loop(self) -> None:
        batches = _Batches(self.max_batch)
        while True:
            with self._lock:
                while not self._stopping and not self._pending and not self._live:
                    self._wake.wait()
                if self._stopping:
                    return
                room = self.max_batch - len(self._live)
                starting = [self._pending.popleft() for _ in range(min(room, len(self._pending)))]
            try:
                self._advance(starting, batches)
            except Exception:  # noqa: BLE001 - the engine thread must outlive any one step's failure
                log.exception("engine step failed")
                for live in list(self._live):
                    self._fail(live.job, RuntimeError("engine step failed"))
                    self._end(live, "failed")

    def _advance(self, starting: list[Job], batches: _Batches) -> None:
        """Start the new jobs, drop the cancelled ones, then one step for every live generation."""
        for job in starting:
            self._start(job, batches)
        for live in list(self._live):
            if live.job.cancelled.is_set():
                self._end(live, "cancelled")
        for batch in [b for b in batches.by_decoder.values() if b is not None and b.members]:
            self.metrics.batch.observe(len(batch.members))
            concerned = [x for x in self._live if x.batch is batch]
            self._guarded(lambda batch=batch: self._route(batch.step()), concerned)
        for live in [x for x in self._live if x.steps is not None]:
            self._guarded(lambda live=live: self._route([(live, next(live.steps))]), [live])

    def _start(self, job: Job, batches: _Batches) -> None:
        """Validate and prefill a job (joining a batch where its decoder can batch); a job that cannot run
        ends here, failed."""
        queue_seconds = time.perf_counter() - job.submitted
        self.metrics.queue.observe(queue_seconds)
        if job.cancelled.is_set():
            self._finish_job(job, "cancelled")
            return
        try:
            ids, params = self._prepare(job)
            live = Live(job, len(ids), queue_seconds)
            batch = batches.get(job.decoder)
            if batch is not None:
                live.batch, live.member = batch, batch.join(ids, params)
            else:
                live.steps = job.decoder.engine.run(ids, params)
        except Exception as e:  # noqa: BLE001 - reported to the request, the others go on
            self._fail(job, e)
            self._finish_job(job, "failed")
            return
        with self._lock:
            self._live.append(live)
            self.peak = max(self.peak, len(self._live))

    def _prepare(self, job: Job):
        prompt = job.prompt
        ids = prompt.encode()
        if prompt.max_prompt_tokens is not None and len(ids) > prompt.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {len(ids)} tokens; this server accepts at most {prompt.max_prompt_tokens}",
                param=prompt.param,
                code="context_length_exceeded",
            )
        params = dict(job.params)
        if params["max_new_tokens"] is None:
            context = job.decoder.engine.max_positions
            room = prompt.max_new_tokens_cap if context is None else context - len(ids)
            max_new_tokens = min(prompt.max_new_tokens_cap, room)
            if max_new_tokens < 1:
                raise APIError(
                    400,
                    f"the prompt ({len(ids)} tokens) leaves no room in the model's context of {context}",
                    param=prompt.param,
                    code="context_length_exceeded",
                )
            params["max_new_tokens"] = max_new_tokens
        return ids, sampling_params(**params)

    def _guarded(self, advance, concerned: list[Live]) -> None:
        """One step; a failure fails the generations it concerned (a batch's, or one), not the server."""
        try:
            advance()
        except Exception as e:  # noqa: BLE001 - reported to those requests, the others go on
            for live in concerned:
                if live in self._live:
                    self._fail(live.job, e)
                    self._end(live, "failed")

    def _route(self, steps) -> None:
        by_member = {id(x.member): x for x in self._live if x.member is not None}
        for who, step in steps:
            live = who if isinstance(who, Live) else by_member[id(who)]
            job = live.job
            if not live.started:  # the first forward went through: the request is valid, the response starts
                live.started = True
                job.emit(Started(live.prompt_tokens))
            if step.token_ids and live.first_token is None:
                live.first_token = time.perf_counter()
                self.metrics.ttft.observe(live.first_token - job.submitted)
            if step.text:
                job.emit(Delta(step.text))
            if step.result is not None:
                job.emit(self._finished(live, step.result))
                live.member = None  # the batch let it go when it finished
                self._end(live, "completed")

    def _finished(self, live: Live, result) -> Finished:
        stats = result.stats
        since = time.perf_counter() - live.first_token if live.first_token is not None else 0.0
        self.metrics.completed(
            live.job.method, stats, live.prompt_tokens, stats.cached_prompt_tokens, live.first_token, since
        )
        extension = {
            "method": live.job.method,
            "mean_accepted_tokens": stats.mean_accepted_tokens,
            "target_forwards": stats.target_forwards,
            "new_tokens": stats.new_tokens,
            "draft_nodes": stats.draft_nodes,
            "acceptance_by_depth": stats.acceptance_by_depth,
            "forced_tokens": stats.forced_tokens,
            "cached_prompt_tokens": stats.cached_prompt_tokens,
            "finish_reason": stats.finish_reason,
            "wall_seconds": stats.wall_seconds,
            "tokens_per_second": stats.tokens_per_second,
            "queue_seconds": live.queue_seconds,
            "runtime": stats.runtime,
        }
        return Finished(
            result.text, result.token_ids, live.prompt_tokens, FINISH_REASONS[stats.finish_reason], extension
        )

    def _end(self, live: Live, outcome: str) -> None:
        """A live generation is over: free its row or close its generator, count it."""
        try:
            if live.member is not None and live.batch is not None and live.member in live.batch.members:
                live.batch.leave(live.member)
        except Exception:  # noqa: BLE001 - the generation is over either way
            log.exception("freeing a batch row failed")
        live.member = None
        if live.steps is not None:
            live.steps.close()  # ends the engine's generator (and frees its cache) here
            live.steps = None
        with self._lock:
            if live in self._live:
                self._live.remove(live)
        self._finish_job(live.job, outcome)

    def _fail(self, job: Job, e: Exception) -> None:
        if isinstance(e, ContextLengthError):  # the engine's check of prompt + max_tokens: OpenAI's code
            e = APIError(400, str(e), param=job.prompt.param, code="context_length_exceeded")
        elif isinstance(e, InputError):
            e = APIError(400, str(e))
        elif not isinstance(e, APIError):
            log.error("generation failed", exc_info=e)
            e = APIError(500, "internal error during generation (see the server log)")
        job.emit(Failed(e))

    def _finish_job(self, job: Job, outcome: str) -> None:
        with self._lock:
            self._jobs.discard(job)
            self.counts[outcome] += 1
        self.metrics.requests.labels(outcome).inc()
