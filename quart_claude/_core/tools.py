"""Tools the host app defines (``@claude.tool``) and the relay runs on the server.

A tool is a plain function, sync or async. Its JSON schema comes from its signature through
pydantic (``create_model`` over the resolved type hints: ``Annotated[..., Field(...)]`` adds
descriptions and bounds), its description from its docstring. A call's input is validated by
the same model before the function runs; a bad input, an exception or a timeout becomes an
``is_error`` result carrying a message (never a traceback), which the model can act on.

A parameter annotated :class:`ToolContext` is not part of the schema: it receives who asked
(the request's identity), the stream and the call's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, ValidationError, create_model
from pydantic_core import PydanticSerializationError, to_jsonable_python

__all__ = [
    "Show",
    "Tool",
    "ToolBox",
    "ToolContext",
    "ToolResult",
    "ToolScope",
    "call_host",
    "in_scope",
]

log = logging.getLogger("quart_claude")

#: The API's rule for tool names.
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")

#: What readers see of a tool's call and result: ``"full"`` (the input and the output),
#: ``"hidden"`` (the name only), or a function of the output that returns what they see of
#: it (a summary; the input is shown).
Show = Literal["full", "hidden"] | Callable[[Any], Any]

#: Entered around each call (the Flask front end passes ``app.app_context``).
ToolScope = Callable[[], contextlib.AbstractContextManager[Any]]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """Given to a tool parameter annotated with this class."""

    identity: str | None  # who asked (the ``authorize`` hook's or the token's), None: no auth
    stream_id: str
    tool_use_id: str


@dataclass(frozen=True, slots=True)
class ToolResult:
    """One call's outcome: ``content`` goes to the model, ``output`` (JSON-able) to readers
    as the tool's ``show`` allows."""

    id: str
    name: str
    content: str
    is_error: bool
    output: Any
    #: how it ended: ok, error, timeout, invalid_input or unknown_tool (metrics and spans)
    outcome: str = "ok"

    def block(self) -> dict[str, Any]:
        """The ``tool_result`` content block the API expects in the next user turn."""
        block: dict[str, Any] = {"type": "tool_result", "tool_use_id": self.id}
        if self.content:
            block["content"] = self.content
        if self.is_error:
            block["is_error"] = True
        return block


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    function: Callable[..., Any]
    arguments: type[BaseModel]  # validates an input; its JSON schema is the input_schema
    context_parameter: str | None
    timeout: float | None
    show: Show

    def definition(self) -> dict[str, Any]:
        schema = self.arguments.model_json_schema()
        schema.pop("title", None)
        return {"name": self.name, "description": self.description, "input_schema": schema}

    def view_input(self, value: Any) -> Any:
        return None if self.show == "hidden" else value

    def view_output(self, result: ToolResult) -> Any:
        show = self.show
        if show == "hidden":
            return None
        if show == "full" or result.is_error:
            return result.output
        try:
            return to_jsonable_python(show(result.output))
        except Exception:  # a summary that fails shows nothing rather than the output
            log.warning("the summary of tool %s failed", self.name, exc_info=True)
            return None


class ToolBox:
    """The tools of one extension object (shared by every app it is registered on); they
    may be added after ``init_app``, and are sent with every request from then on."""

    def __init__(self) -> None:
        self.tools: dict[str, Tool] = {}
        self._definitions: list[dict[str, Any]] | None = None

    def __bool__(self) -> bool:
        return bool(self.tools)

    def definitions(self) -> list[dict[str, Any]]:
        if self._definitions is None:
            self._definitions = [tool.definition() for tool in self.tools.values()]
        return self._definitions

    def label(self, name: str) -> str:
        """A tool's metric label: its name if it is registered (the model may make names up)."""
        return name if name in self.tools else "_unknown"

    def shown_input(self, call: Mapping[str, Any]) -> Any:
        """What readers see of a call's input (all of it for a tool nobody registered)."""
        tool = self.tools.get(call["name"])
        return tool.view_input(call["input"]) if tool is not None else call["input"]

    def shown_output(self, result: ToolResult) -> Any:
        """What readers see of a result: the tool's choice (its message for an unknown one)."""
        tool = self.tools.get(result.name)
        return tool.view_output(result) if tool is not None else result.output

    def register(
        self,
        function: Callable[..., Any],
        *,
        name: str | None = None,
        description: str | None = None,
        timeout: float | None = None,
        show: Show = "full",
    ) -> Tool:
        """Add ``function`` as a tool; raises ValueError (naming the tool) when it cannot be
        one."""
        tool_name: str = name or str(getattr(function, "__name__", ""))
        if not TOOL_NAME.match(tool_name):
            raise ValueError(f"tool name {tool_name!r} must match {TOOL_NAME.pattern}")
        if tool_name in self.tools:
            raise ValueError(f"a tool named {tool_name!r} is already registered")
        text = description if description is not None else inspect.getdoc(function)
        if not text or not text.strip():
            raise ValueError(
                f"tool {tool_name!r} needs a description: give the function a docstring"
            )
        if timeout is not None and not timeout > 0:
            raise ValueError(f"tool {tool_name!r}: timeout must be a positive number of seconds")
        if show not in ("full", "hidden") and not callable(show):
            raise ValueError(f"tool {tool_name!r}: show must be 'full', 'hidden' or a function")
        arguments, context = _arguments_model(tool_name, function)
        tool = Tool(tool_name, text.strip(), function, arguments, context, timeout, show)
        tool.definition()  # a type pydantic cannot describe fails here, not on a request
        self.tools[tool_name] = tool
        self._definitions = None
        return tool

    async def run(
        self,
        call_id: str,
        name: str,
        input_value: Any,
        *,
        identity: str | None,
        stream_id: str,
        default_timeout: float,
        scope: ToolScope | None = None,
    ) -> ToolResult:
        """Run one call to its end: a result, never an exception (but cancellation)."""
        tool = self.tools.get(name)
        if tool is None:
            return _error(call_id, name, f"there is no tool named {name!r}", "unknown_tool")
        try:
            arguments = tool.arguments.model_validate(
                input_value if isinstance(input_value, Mapping) else {}
            )
        except ValidationError as exc:
            return _error(call_id, name, "invalid input: " + _problems(exc), "invalid_input")
        kwargs = {field: getattr(arguments, field) for field in type(arguments).model_fields}
        if tool.context_parameter is not None:
            kwargs[tool.context_parameter] = ToolContext(identity, stream_id, call_id)
        timeout = tool.timeout if tool.timeout is not None else default_timeout
        try:
            async with asyncio.timeout(timeout) as deadline:
                value = await call_host(tool.function, scope, **kwargs)
        except TimeoutError:
            if not deadline.expired():
                return _error(call_id, name, "TimeoutError")
            log.warning("tool %s timed out after %gs", name, timeout)
            return _error(call_id, name, f"the tool did not finish within {timeout:g} s", "timeout")
        except Exception as exc:
            log.warning("tool %s raised %s", name, type(exc).__name__, exc_info=True)
            return _error(call_id, name, str(exc) or type(exc).__name__)
        try:
            output = to_jsonable_python(value)
            content = output if isinstance(output, str) else json.dumps(output)
        except (PydanticSerializationError, TypeError, ValueError):
            log.warning("tool %s returned a value that is not JSON", name, exc_info=True)
            return _error(call_id, name, "the tool returned a value that is not JSON")
        return ToolResult(call_id, name, content, False, output)


async def call_host(
    function: Callable[..., Any], scope: ToolScope | None, *args: Any, **kwargs: Any
) -> Any:
    """A function of the host's (a tool, a guard, a hook): awaited inside ``scope`` when it
    is async, else in a thread (a sync one that blocks must not stall every stream)."""
    if inspect.iscoroutinefunction(function):
        with scope() if scope is not None else contextlib.nullcontext():
            return await function(*args, **kwargs)
    return await asyncio.to_thread(in_scope, scope, function, *args, **kwargs)


def in_scope(
    scope: ToolScope | None, function: Callable[..., Any], *args: Any, **kwargs: Any
) -> Any:
    """A sync call, in its thread, inside ``scope``."""
    with scope() if scope is not None else contextlib.nullcontext():
        return function(*args, **kwargs)


def _error(call_id: str, name: str, message: str, outcome: str = "error") -> ToolResult:
    return ToolResult(call_id, name, message, True, message, outcome)


def _problems(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(part) for part in error['loc']) or 'input'}: {error['msg']}"
        for error in exc.errors(include_url=False)
    )


_STRICT = ConfigDict(extra="forbid")


def _arguments_model(name: str, function: Callable[..., Any]) -> tuple[type[BaseModel], str | None]:
    """The pydantic model of ``function``'s parameters, and the one that takes a
    :class:`ToolContext` (if any)."""
    if not callable(function):
        raise ValueError(f"tool {name!r} is not callable")
    try:
        hints = get_type_hints(function, include_extras=True)
    except Exception as exc:
        raise ValueError(f"tool {name!r}: its type hints cannot be resolved ({exc})") from exc
    fields: dict[str, Any] = {}
    context = None
    for parameter in inspect.signature(function).parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ValueError(f"tool {name!r}: *args and **kwargs cannot be described to a model")
        if parameter.kind is parameter.POSITIONAL_ONLY:
            raise ValueError(f"tool {name!r}: parameter {parameter.name!r} is positional-only")
        hint = hints.get(parameter.name, Any)
        if hint is ToolContext:
            context = parameter.name
            continue
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hint, default)
    model: type[BaseModel] = create_model(name, __config__=_STRICT, **fields)
    return model, context
