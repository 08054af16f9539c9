"""The OpenAPI 3.1 document at ``{prefix}/openapi.json``: the responses and events as pydantic
models (documentation only: the encoder writes them), beside the request models of
``schema.py``. Imported when the document is first asked for, so a worker that never serves
it holds none of these models.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .config import ClaudeConfig
from .protocol import ERROR_CLASSES
from .schema import chat_body_model

__all__ = ["openapi_document"]


# -- responses and events (documentation; the encoder writes them) ---------------------------
class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class StartEvent(BaseModel):
    type: Literal["start"]
    stream_id: str
    model: str | None
    message_id: str | None
    usage: Usage


class DeltaEvent(BaseModel):
    type: Literal["delta"]
    text: str


class DoneEvent(BaseModel):
    type: Literal["done"]
    stop_reason: str | None
    usage: Usage
    #: on a refusal: the API's category, explanation and recommended model, as it sent them
    stop_details: dict[str, Any] | None = None
    #: when code execution ran: the API's container (``id``, ``expires_at``)
    container: dict[str, Any] | None = None


class ErrorEvent(BaseModel):
    type: Literal["error"]
    error: Literal[tuple(ERROR_CLASSES)]  # type: ignore[valid-type]
    message: str
    retryable: bool
    retry_after: int | None = None
    partial: bool | None = None
    #: a draining server handed the stream off: resume it (not the stream's last event)
    resume: bool | None = None
    stream_id: str | None = None


class ThinkingEvent(BaseModel):
    """Protocol v1.1: the model's thinking, before its text (``CLAUDE_THINKING``);
    ``restart``: the thinking so far is void (a retry thinks again)."""

    type: Literal["thinking"]
    text: str
    restart: bool | None = None


class CitationEvent(BaseModel):
    """Protocol v1.2: a source of the text just sent: ``citation`` as the API gave it (a
    ``web_search_result_location`` with ``url`` and ``title``, a document's ``char_location``
    or ``page_location``, ...), ``text`` the passage of the answer it supports."""

    type: Literal["citation"]
    citation: dict[str, Any]
    text: str


class ToolCallEvent(BaseModel):
    """Protocol v1.1: the model called a tool (``@claude.tool``, run on this server once the
    model has finished asking; ``server``: one the API runs itself). ``input`` is null when
    the tool hides it."""

    type: Literal["tool_call"]
    id: str
    name: str
    input: Any = None
    server: bool | None = None


class ToolResultEvent(BaseModel):
    """Protocol v1.1: a tool's result, as much of it as the tool shows (null: hidden)."""

    type: Literal["tool_result"]
    id: str
    name: str
    is_error: bool
    output: Any = None
    server: bool | None = None


class ToolCall(BaseModel):
    """A tool the model used, with its result, as readers see them (``POST /chat``)."""

    id: str
    name: str
    input: Any = None
    is_error: bool | None = None
    output: Any = None
    server: bool | None = None


class ChatReply(BaseModel):
    id: str | None
    model: str | None
    text: str
    stop_reason: str | None
    usage: Usage
    tool_calls: list[ToolCall] | None = None  # present when the model used tools
    stop_details: dict[str, Any] | None = None  # as in the done event
    container: dict[str, Any] | None = None  # as in the done event
    citations: list[CitationEvent] | None = None  # present when the answer cites sources


class ErrorBody(BaseModel):
    error: str
    message: str


class Health(BaseModel):
    status: Literal["ok"]
    timestamp: int


class Ready(BaseModel):
    status: str
    streams: int | None = None


class UIMessagePart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str
    text: str | None = None


class UIMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str | None = None
    role: Literal["user", "assistant"]
    parts: list[UIMessagePart]


class AiSdkChatRequest(BaseModel):
    """``useChat``'s request (``DefaultChatTransport``); extra fields are ignored."""

    model_config = ConfigDict(extra="allow")
    id: str = Field(min_length=1, max_length=200)
    messages: list[UIMessage]
    trigger: str | None = None


class Stopped(BaseModel):
    stream_id: str
    status: Literal["cancelled", "finished"]


_MODELS: tuple[type[BaseModel], ...] = (
    Usage,
    StartEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    ThinkingEvent,
    CitationEvent,
    ToolCallEvent,
    ToolResultEvent,
    ChatReply,
    ErrorBody,
    Health,
    Ready,
    Stopped,
    AiSdkChatRequest,
)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int) -> dict[str, Any]:
    return {str(status): _json("ErrorBody", "an error, as JSON") for status in statuses}


def openapi_document(config: ClaudeConfig, conversations: bool = False) -> dict[str, Any]:
    """OpenAPI 3.1 for this app's blueprint, from the models above."""
    schemas: dict[str, Any] = {}
    body = chat_body_model(config)
    for model in (body, *_MODELS):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    events = {"oneOf": [_ref(name) for name in ("StartEvent", "DeltaEvent", "DoneEvent")]}
    events["oneOf"] += [_ref(name) for name in ("ErrorEvent", "ThinkingEvent")]
    events["oneOf"] += [_ref(name) for name in ("ToolCallEvent", "ToolResultEvent")]
    events["oneOf"] += [_ref("CitationEvent")]
    schemas["StreamEvent"] = events
    sse = {
        "description": (
            "text/event-stream: each event one `data:` line holding a StreamEvent as JSON, "
            "then `id: <n>`; `: ping` comments between events (protocol v1)"
        ),
        # each event as SSE parsers (and OpenAPI 3.2's itemSchema) see it: its fields, the
        # data a StreamEvent as JSON
        "content": {
            "text/event-stream": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "data": {
                            "type": "string",
                            "contentMediaType": "application/json",
                            "contentSchema": _ref("StreamEvent"),
                        },
                        "id": {"type": "string", "pattern": "^[0-9]+$"},
                        "event": {"type": "string"},
                        "retry": {"type": "integer", "minimum": 0},
                    },
                    "required": ["data"],
                }
            }
        },
        "headers": {"X-Stream-Id": {"schema": {"type": "string"}}},
    }
    request_body = {
        "required": True,
        "content": {"application/json": {"schema": _ref("ChatRequest")}},
    }
    stream_id = {"name": "stream_id", "in": "path", "required": True, "schema": {"type": "string"}}
    last_event_id = {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "schema": {"type": "string", "pattern": "^(-1|[0-9]{1,18})$"},
    }
    chat_errors = _errors(400, 401, 408, 413, 415, 429, 503)
    guarded: dict[str, Any] = {"security": [{"bearer": []}]} if config.api_tokens else {}
    prefix = config.url_prefix
    paths: dict[str, Any] = {
        f"{prefix}/chat/stream": {
            "post": {
                "summary": "Stream a reply as Server-Sent Events",
                "operationId": "chatStream",
                **guarded,
                "requestBody": request_body,
                "responses": {"200": sse, **chat_errors},
            }
        },
        f"{prefix}/chat": {
            "post": {
                "summary": "A whole reply as JSON",
                "operationId": "chat",
                **guarded,
                "requestBody": request_body,
                "responses": {
                    "200": _json("ChatReply", "the reply"),
                    **chat_errors,
                    **_errors(502, 504),
                },
            }
        },
        f"{prefix}/chat/stream/{{stream_id}}": {
            "get": {
                "summary": "Resume a stream after Last-Event-ID (or from the start)",
                "operationId": "resumeStream",
                **guarded,
                "parameters": [stream_id, last_event_id],
                "responses": {
                    "200": sse,
                    "204": {"description": "nothing after Last-Event-ID, ever"},
                    **_errors(400, 401, 404, 503),
                },
            },
            "delete": {
                "summary": "Stop a stream (the upstream request is closed)",
                "operationId": "stopStream",
                **guarded,
                "parameters": [stream_id],
                "responses": {"200": _json("Stopped", "stopped"), **_errors(401, 404, 503)},
            },
        },
        f"{prefix}/ai-sdk/chat": {
            "post": {
                "summary": "useChat's endpoint: the AI SDK UI message stream protocol (v1)",
                "operationId": "aiSdkChat",
                **guarded,
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("AiSdkChatRequest")}},
                },
                "responses": {
                    "200": {
                        "description": "text/event-stream of UI message chunks, then [DONE]",
                        "content": {"text/event-stream": {"schema": {}}},
                    },
                    **chat_errors,
                },
            }
        },
        f"{prefix}/ai-sdk/chat/{{chat_id}}/stream": {
            "get": {
                "summary": "useChat({resume: true}): the chat's stream in progress, replayed",
                "operationId": "aiSdkResume",
                **guarded,
                "parameters": [
                    {
                        "name": "chat_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "text/event-stream of UI message chunks",
                        "content": {"text/event-stream": {"schema": {}}},
                    },
                    "204": {"description": "no stream in progress for this chat"},
                    **_errors(401, 503),
                },
            }
        },
        f"{prefix}/claude-stream.js": {
            "get": {
                "summary": "The browser client (no build step, no dependency)",
                "operationId": "clientScript",
                "responses": {
                    "200": {
                        "description": "JavaScript",
                        "content": {"text/javascript": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        f"{prefix}/openapi.json": {
            "get": {
                "summary": "This document",
                "operationId": "openapi",
                "responses": {
                    "200": {
                        "description": "OpenAPI 3.1",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
            }
        },
        f"{prefix}/docs": {
            "get": {
                "summary": "A page listing these routes",
                "operationId": "docs",
                "responses": {
                    "200": {
                        "description": "HTML",
                        "content": {"text/html": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        **(
            {
                f"{prefix}/metrics": {
                    "get": {
                        "summary": "Prometheus metrics (text exposition or OpenMetrics)",
                        "operationId": "metrics",
                        **(guarded if config.metrics_auth else {}),
                        "responses": {
                            "200": {
                                "description": "the metrics, every worker's",
                                "content": {"text/plain": {"schema": {"type": "string"}}},
                            },
                            **(_errors(401) if guarded and config.metrics_auth else {}),
                        },
                    }
                }
            }
            if config.metrics
            else {}
        ),
        f"{prefix}/health": {
            "get": {
                "summary": "Liveness",
                "operationId": "health",
                "responses": {"200": _json("Health", "alive")},
            }
        },
        f"{prefix}/ready": {
            "get": {
                "summary": "Readiness",
                "operationId": "ready",
                "responses": {
                    "200": _json("Ready", "serving"),
                    "503": _json("Ready", "starting, draining, or the store is down"),
                },
            }
        },
    }
    if config.database_url is not None or conversations:
        paths.update(_conversation_paths(prefix, guarded))
        schemas["Conversation"] = {"type": "object", "additionalProperties": True}
    return {
        "openapi": "3.1.0",
        "info": {"title": "quart-claude", "version": _version()},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _conversation_paths(prefix: str, guarded: dict[str, Any]) -> dict[str, Any]:
    """The routes of stored conversations (see docs/conversations.md)."""
    path_id = {"name": "conversation_id", "in": "path", "required": True}
    one = [{**path_id, "schema": {"type": "string"}}]
    found = {"200": _json("Conversation", "the conversation"), **_errors(400, 401, 404, 503)}
    return {
        f"{prefix}/conversations": {
            "get": {
                "summary": "The identity's conversations, newest first (keyset pages)",
                "operationId": "listConversations",
                **guarded,
                "parameters": [
                    {"name": "limit", "in": "query", "schema": {"type": "integer"}},
                    {"name": "before", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": {"200": _json("Conversation", "a page"), **_errors(400, 401, 503)},
            }
        },
        f"{prefix}/conversations/{{conversation_id}}": {
            "get": {
                "summary": "A conversation's current branch (or ?leaf=), as readers saw it",
                "operationId": "readConversation",
                **guarded,
                "parameters": [
                    *one,
                    {"name": "leaf", "in": "query", "schema": {"type": "string"}},
                ],
                "responses": found,
            },
            "patch": {
                "summary": "Rename it, or make a branch current",
                "operationId": "updateConversation",
                **guarded,
                "parameters": one,
                "responses": found,
            },
            "delete": {
                "summary": "Erase it, every branch",
                "operationId": "deleteConversation",
                **guarded,
                "parameters": one,
                "responses": found,
            },
        },
    }


def _version() -> str:
    from .._version import __version__

    return __version__
