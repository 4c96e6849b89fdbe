"""Tool calls: the tools told to the model in its system turn, a call constrained by a
grammar when `tool_choice` demands one, and the answer read back into `tool_calls`.

A call is a JSON object `{"name": ..., "arguments": {...}}`. With tool_choice
"required" the grammar allows a call of any listed tool, with a named function only
that one (each call's arguments under its JSON Schema); with "auto" the model may
write text or a call, and an answer that parses as a call of a listed tool is one.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

from symphony.lipctl.openai_api.errors import ApiError

PREAMBLE = (
    "You can call functions. To call one, answer with only a JSON object "
    '{"name": <the function\'s name>, "arguments": <an object of its arguments>}. '
    "The functions:\n"
)


@dataclass(frozen=True)
class Tools:
    """A request's tools and what its tool_choice asks (None: no tools in play)."""

    functions: dict[str, dict[str, Any]]  # name -> {"description", "parameters"}
    choice: str  # "auto", "required", or a function's name

    @classmethod
    def of(cls, tools: list[dict[str, Any]] | None, choice: Any) -> Tools | None:
        """Raises: ApiError: 400 naming what is malformed."""
        if not tools:
            if choice not in (None, "none", "auto"):
                raise ApiError(
                    400, "tool_choice asks a call, and no tools are given", param="tool_choice"
                )
            return None
        if choice == "none":
            return None
        functions: dict[str, dict[str, Any]] = {}
        for i, tool in enumerate(tools):
            fn = tool.get("function") if tool.get("type") == "function" else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                raise ApiError(
                    400, "a tool is {type: function, function: {name, ...}}", param=f"tools[{i}]"
                )
            params = fn.get("parameters") or {"type": "object", "properties": {}}
            if not isinstance(params, dict):
                raise ApiError(400, "parameters is a JSON Schema", param=f"tools[{i}]")
            functions[fn["name"]] = {"description": fn.get("description", ""), "parameters": params}
        if choice is None or choice in ("auto", "required"):
            return cls(functions, choice or "auto")
        wanted = choice.get("function") if isinstance(choice, dict) else None
        name = wanted.get("name") if isinstance(wanted, dict) else None
        if name not in functions:
            raise ApiError(
                400, f"tool_choice names no listed function: {choice!r}", param="tool_choice"
            )
        return cls(functions, name)

    def system_text(self) -> str:
        listed = [{"name": n, **spec} for n, spec in self.functions.items()]
        return PREAMBLE + json.dumps(listed)

    def grammar(self) -> dict[str, Any] | None:
        """The grammar a demanded call is generated under (None for "auto")."""
        if self.choice == "auto":
            return None
        names = list(self.functions) if self.choice == "required" else [self.choice]
        calls = [
            {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": self.functions[name]["parameters"],
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            for name in names
        ]
        return {"json_schema": calls[0] if len(calls) == 1 else {"anyOf": calls}}

    def read_call(self, text: str) -> dict[str, Any] | None:
        """The tool call `text` makes, as `tool_calls` holds one, or None if it is text."""
        try:
            value = json.loads(text)
        except ValueError:
            return None
        if not (isinstance(value, dict) and value.get("name") in self.functions):
            return None
        arguments = value.get("arguments", {})
        return {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": value["name"], "arguments": json.dumps(arguments)},
        }


def with_tools(messages: list[dict[str, str]], tools: Tools) -> list[dict[str, str]]:
    """The messages with the tools told in the system turn (a first one if none)."""
    if messages and messages[0]["role"] == "system":
        first = {**messages[0], "content": messages[0]["content"] + "\n\n" + tools.system_text()}
        return [first, *messages[1:]]
    return [{"role": "system", "content": tools.system_text()}, *messages]


def history_text(message: Any) -> str:
    """An earlier assistant turn's tool calls, written as the model writes them."""
    calls = []
    for i, call in enumerate(message.tool_calls or ()):
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ApiError(
                400,
                "a tool call is {function: {name, arguments}}",
                param=f"messages.tool_calls[{i}]",
            )
        arguments = fn.get("arguments") or "{}"
        if isinstance(arguments, str):  # JSON text, as the API writes it (else as it is)
            with contextlib.suppress(ValueError):
                arguments = json.loads(arguments)
        calls.append(json.dumps({"name": fn["name"], "arguments": arguments}))
    return "\n".join([message.text(), *calls]).strip()
