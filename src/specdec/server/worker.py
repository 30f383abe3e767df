"""One engine thread: generations run one at a time, in arrival order, off the event loop.

Each job runs start to end on this one thread: a model's forward is not safe to run from two threads at once,
and the tokenizer is used only here too (Hugging Face fast tokenizers mutate shared state when called and are
not safe to share across threads). Batching several generations into one step is a later change. Events reach the
request's asyncio queue through `call_soon_threadsafe`; a request that goes away sets `cancelled`, and the
job stops at its next step and closes the engine generator.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from specdec.api import SpecDecoder, sampling_params
from specdec.errors import ContextLengthError, InputError
from specdec.server.errors import APIError

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


class EngineWorker:
    def __init__(self, max_queued: int) -> None:
        self.max_queued = max_queued
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specdec-engine")
        self._lock = threading.Lock()
        self._jobs: set[Job] = set()  # submitted and not yet done
        self.active: Job | None = None
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}

    def submit(self, job: Job) -> None:
        with self._lock:
            if len(self._jobs) > self.max_queued:  # one may be running; max_queued more may wait
                raise APIError(
                    503, "the server is busy (too many queued requests); retry later", code="server_busy"
                )
            self._jobs.add(job)
        self._executor.submit(self._run, job)

    def snapshot(self) -> dict:
        with self._lock:
            running = int(self.active is not None)
            return {"running": running, "queued": len(self._jobs) - running, **self.counts}

    def shutdown(self) -> None:
        with self._lock:
            for job in self._jobs:
                job.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _run(self, job: Job) -> None:
        with self._lock:
            self.active = job
        outcome = "cancelled"
        try:
            if not job.cancelled.is_set():
                outcome = self._generate(job)
        except (APIError, InputError) as e:
            outcome = "failed"
            if isinstance(e, ContextLengthError):  # the engine's check of prompt + max_tokens: OpenAI's code
                e = APIError(400, str(e), param=job.prompt.param, code="context_length_exceeded")
            job.emit(Failed(e if isinstance(e, APIError) else APIError(400, str(e))))
        except Exception:
            outcome = "failed"
            log.exception("generation failed")
            job.emit(Failed(APIError(500, "internal error during generation (see the server log)")))
        finally:
            with self._lock:
                self.active = None
                self._jobs.discard(job)
                self.counts[outcome] += 1

    def _generate(self, job: Job) -> str:
        queue_seconds = time.perf_counter() - job.submitted
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
        steps = job.decoder.engine.run(ids, sampling_params(**params))
        result = None
        try:
            for i, step in enumerate(steps):
                if job.cancelled.is_set():
                    return "cancelled"
                if i == 0:  # the first forward went through: the request is valid, the response can start
                    job.emit(Started(len(ids)))
                if step.text:
                    job.emit(Delta(step.text))
                result = step.result
        finally:
            steps.close()  # after a cancel: ends the engine's generator (and its inference_mode) here
        assert result is not None  # the engine's last step carries the result
        stats = result.stats
        extension = {
            "method": job.method,
            "mean_accepted_tokens": stats.mean_accepted_tokens,
            "target_forwards": stats.target_forwards,
            "new_tokens": stats.new_tokens,
            "draft_nodes": stats.draft_nodes,
            "acceptance_by_depth": stats.acceptance_by_depth,
            "finish_reason": stats.finish_reason,
            "wall_seconds": stats.wall_seconds,
            "tokens_per_second": stats.tokens_per_second,
            "queue_seconds": queue_seconds,
        }
        job.emit(
            Finished(
                result.text,
                result.token_ids,
                len(ids),
                FINISH_REASONS[stats.finish_reason],
                extension,
            )
        )
        return "completed"
