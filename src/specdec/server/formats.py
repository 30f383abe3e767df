"""The response bodies of the two endpoints: whole responses and the chunks of a stream, with a chat reply's
tool calls (`specdec.server.structured`) in OpenAI's shape."""

from __future__ import annotations

import time
import uuid

from specdec.server.structured import ToolPlan
from specdec.server.worker import Finished


class Format:
    """The response shapes of one endpoint."""

    object: str
    chunk_object: str
    prefix: str

    def __init__(self, model_name: str) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model_name

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def opening(self) -> list[dict]:
        return []

    def chunks(self, text: str, finished: Finished | None = None) -> list[dict]:
        """What a stream sends for a text delta (and, with `finished`, the end of the reply)."""
        out = [self._chunk(self._content(text, streaming=True))] if text or finished is None else []
        if finished is not None:
            out.append(self._chunk(self._content("", streaming=True), finished))
        return out

    def _chunk(self, content: dict, finished: Finished | None = None, reason: str | None = None) -> dict:
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": None}
        out = {**self._head(self.chunk_object), "choices": [choice]}
        if finished is not None:
            choice["finish_reason"] = reason or finished.finish_reason
            out["specdec"] = finished.stats
        return out

    def usage_chunk(self, finished: Finished) -> dict:
        return {**self._head(self.chunk_object), "choices": [], "usage": usage(finished)}

    def full(self, finished: Finished) -> dict:
        content, reason = self._reply(finished)
        choice = {"index": 0, **content, "logprobs": None, "finish_reason": reason}
        return {
            **self._head(self.object),
            "choices": [choice],
            "usage": usage(finished),
            "specdec": finished.stats,
        }

    def _reply(self, finished: Finished) -> tuple[dict, str]:
        return self._content(finished.text, streaming=False), finished.finish_reason

    def _content(self, text: str, streaming: bool) -> dict:
        raise NotImplementedError


class CompletionFormat(Format):
    object = chunk_object = "text_completion"
    prefix = "cmpl"

    def _content(self, text: str, streaming: bool) -> dict:
        return {"text": text}


class ChatFormat(Format):
    """Chat replies; with tools that may be called (`plan`), a reply that is a call becomes `tool_calls`. A
    stream holds back what may be a call (all of a forced one; for "auto", a reply starting with "{") until
    its end shows which it is."""

    object = "chat.completion"
    chunk_object = "chat.completion.chunk"
    prefix = "chatcmpl"

    def __init__(self, model_name: str, plan: ToolPlan | None = None) -> None:
        super().__init__(model_name)
        self.plan = plan if plan is not None and plan.calls else None
        self.held = ""  # text held back (a call, maybe)
        self.sent = False  # content was streamed: the reply is content

    def opening(self) -> list[dict]:
        choice = {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
        return [{**self._head(self.chunk_object), "choices": [choice]}]

    def chunks(self, text: str, finished: Finished | None = None) -> list[dict]:
        plan = self.plan
        if plan is None or self.sent:
            return super().chunks(text, finished)
        self.held += text
        if not plan.forced and self.held.strip() and not self.held.lstrip().startswith("{"):
            self.sent, text, self.held = True, self.held, ""
            return super().chunks(text, finished)  # plain content after all
        if finished is None:
            return []
        calls = plan.parse(self.held)
        if calls is None:
            self.sent, text, self.held = True, self.held, ""
            return super().chunks(text, finished)
        delta = {"delta": {"content": None, "tool_calls": [{"index": 0, **call} for call in calls]}}
        return [self._chunk(delta), self._chunk({"delta": {}}, finished, "tool_calls")]

    def _reply(self, finished: Finished) -> tuple[dict, str]:
        calls = self.plan.parse(finished.text) if self.plan is not None else None
        if calls is None:
            return super()._reply(finished)
        message = {"role": "assistant", "content": None, "tool_calls": calls}
        return {"message": message}, "tool_calls"  # a whole call (one cut by max_tokens does not parse)

    def _content(self, text: str, streaming: bool) -> dict:
        if streaming:
            return {"delta": {"content": text} if text else {}}
        return {"message": {"role": "assistant", "content": text}}


def usage(finished: Finished) -> dict:
    completion = len(finished.token_ids)
    return {
        "prompt_tokens": finished.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": finished.prompt_tokens + completion,
    }
