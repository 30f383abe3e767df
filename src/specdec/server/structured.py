"""OpenAI's structured output at the server: `response_format` (both endpoints) and `tools` with `tool_choice`
(chat), turned into the engine's `Constraint` and, for tools, into the reply's `tool_calls`.

- `response_format`: {"type": "text"} (unconstrained), {"type": "json_object"} (one JSON object), or
  {"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": bool}}.
- `tool_choice` "required": the reply is one call, the JSON object {"name": <a tool's name>, "arguments":
  <that tool's parameters schema>}, decoded under that schema; a named function ({"type": "function",
  "function": {"name": ...}}): the reply is that function's arguments, under its schema. Either way the
  message carries `tool_calls` and the finish reason is "tool_calls" (or "length" when max_tokens cut it).
- "auto" (OpenAI's default when tools are given): the model decodes unconstrained, with the tools rendered by
  the chat template; a reply that is such a call object becomes `tool_calls`, anything else is content.
  While streaming, a reply that starts with "{" is held back until it is known which of the two it is.
- "none": the tools are rendered by the template and the reply is content.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from specdec.grammar import Constraint
from specdec.server.errors import APIError


def response_constraint(response_format: dict | None) -> Constraint | None:
    """The constraint a `response_format` asks for (None: plain text); APIError 400 for a malformed one."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_object()
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise APIError(
                400,
                'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}',
                "response_format",
            )
        strict = spec.get("strict")
        return Constraint.json_schema(spec.get("schema", {}), strict=True if strict is None else bool(strict))
    raise APIError(
        400,
        f"response_format type must be text, json_object or json_schema (got {kind!r})",
        "response_format",
    )


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request's tools ask of the reply."""

    tools: list[dict]  # as sent: {"type": "function", "function": {"name", "description", "parameters"}}
    mode: str  # "none", "auto", "required", or "function": the call of `function` is the reply
    function: str | None = None

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def parameters(self, name: str) -> dict:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or {"type": "object"}
        raise KeyError(name)

    @property
    def calls(self) -> bool:
        """The reply may be a call."""
        return self.mode != "none"

    @property
    def forced(self) -> bool:
        """The reply is a call, whatever the model would say."""
        return self.mode in ("required", "function")

    def constraint(self) -> Constraint | None:
        if not self.forced:
            return None
        if self.function is not None:
            return Constraint.json_schema(self.parameters(self.function))
        calls = [
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": self.parameters(name)},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in self.names
        ]
        return Constraint.json_schema(calls[0] if len(calls) == 1 else {"anyOf": calls})

    def parse(self, text: str) -> list[dict] | None:
        """The reply's `tool_calls`, or None when it is not a call (then it is content)."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if self.function is not None:
            name, arguments = self.function, value
        elif (
            isinstance(value, dict)
            and value.get("name") in self.names
            and isinstance(value.get("arguments"), dict)
        ):
            name, arguments = value["name"], value["arguments"]
        else:
            return None
        return [
            {
                "id": f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
            }
        ]


def tool_plan(tools: list | None, tool_choice: Any) -> ToolPlan | None:
    """The request's tools checked (APIError 400 naming what is wrong); None without tools."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return None
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            raise APIError(400, f'tools[{i}] must be {{"type": "function", "function": {{...}}}}', "tools")
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise APIError(400, f"tools[{i}].function needs a name", "tools")
        if not isinstance(function.get("parameters", {}), dict):
            raise APIError(400, f"tools[{i}].function.parameters must be a JSON Schema object", "tools")
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tools have the same name twice", "tools")
    if tool_choice is None:
        tool_choice = "auto"
    if isinstance(tool_choice, dict):
        name = (
            (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        )
        if name not in names:
            raise APIError(400, f"tool_choice names no given tool (tools: {', '.join(names)})", "tool_choice")
        return ToolPlan(list(tools), "function", name)
    if tool_choice not in ("none", "auto", "required"):
        raise APIError(
            400, 'tool_choice must be none, auto, required or {"type": "function", ...}', "tool_choice"
        )
    return ToolPlan(list(tools), tool_choice)
