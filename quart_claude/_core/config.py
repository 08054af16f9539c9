"""Configuration: one frozen value object, resolved once per app in ``init_app``.

Every key can come from a keyword option (``Claude(app, max_retries=5)``), ``app.config``
(``CLAUDE_MAX_RETRIES``) or the environment (``CLAUDE_MAX_RETRIES``); the first one set wins in
that order, then the default. Bad values fail at ``init_app`` with a message naming the key.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from .budget import MIN_THINKING_BUDGET
from .config_error import ConfigError
from .fallback import DEFAULT_ON
from .prices import PRICES

__all__ = ["ClaudeConfig", "ConfigError", "DEFAULT_MODEL", "load_config"]

#: A current model id (the SDK does not warn that it is deprecated; a test checks).
DEFAULT_MODEL = "claude-sonnet-5-5"


def _positive_int(key: str, value: Any) -> int:
    number = _int(key, value)
    if number < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
    return number


def _non_negative_int(key: str, value: Any) -> int:
    number = _int(key, value)
    if number < 0:
        raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
    return number


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise ConfigError(f"{key} must be an integer, got {value!r}")


def _seconds(key: str, value: Any, *, allow_zero: bool = True) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a number of seconds, got {value!r}") from None
    if math.isnan(number) or math.isinf(number) or number < 0 or (not allow_zero and number == 0):
        bound = "non-negative" if allow_zero else "positive"
        raise ConfigError(f"{key} must be a {bound} finite number of seconds, got {value!r}")
    return number


def _positive_seconds(key: str, value: Any) -> float:
    return _seconds(key, value, allow_zero=False)


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
    raise ConfigError(f"{key} must be a boolean (true/false), got {value!r}")


def _auto_bool(key: str, value: Any) -> bool | None:
    """A boolean, or None (``auto``, the default: the extension decides)."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "auto"}):
        return None
    return _bool(key, value)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {type(value).__name__}")
    return value


def _optional_str(key: str, value: Any) -> str | None:
    if value is None:
        return None
    text = _str(key, value).strip()
    return text or None


def _non_empty_str(key: str, value: Any) -> str:
    text = _str(key, value).strip()
    if not text:
        raise ConfigError(f"{key} must not be empty")
    return text


def _url_prefix(key: str, value: Any) -> str:
    text = _str(key, value).strip()
    if not text:
        return ""
    if not text.startswith("/") or text.endswith("/") or "//" in text:
        raise ConfigError(
            f"{key} must look like '/ai' (leading slash, no trailing slash), got {text!r}"
        )
    return text


def _models(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",")]
    elif isinstance(value, list | tuple | set | frozenset):
        items = [_str(key, item).strip() for item in value]
    else:
        raise ConfigError(f"{key} must be a comma-separated string or a list, got {value!r}")
    return tuple(item for item in items if item)


def _rate_limit(key: str, value: Any) -> tuple[Any, ...]:
    text = _str(key, value).strip()
    if not text:
        return ()
    from .ratelimit import parse_rate_limit

    try:
        return parse_rate_limit(key, text)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _http_client(key: str, value: Any) -> str:
    text = _str(key, value).strip().lower()
    if text not in ("auto", "httpx", "aiohttp"):
        raise ConfigError(f"{key} must be 'auto', 'httpx' or 'aiohttp', got {value!r}")
    return text


def _thinking(key: str, value: Any) -> str | int:
    """``off``, ``adaptive`` (the model decides), or a token budget (at least 1024)."""
    if isinstance(value, str) and value.strip().lower() in ("off", "adaptive"):
        return value.strip().lower()
    try:
        budget = _int(key, value)
    except ConfigError:
        raise ConfigError(
            f"{key} must be 'off', 'adaptive' or a token budget, got {value!r}"
        ) from None
    if budget < MIN_THINKING_BUDGET:
        raise ConfigError(f"{key}: a thinking budget is at least {MIN_THINKING_BUDGET} tokens")
    return budget


def _server_tools(key: str, value: Any) -> tuple[dict[str, Any], ...]:
    """Tool definitions the API runs itself (web search, code execution), as JSON or a
    list of dicts: each needs a ``type`` and a ``name``."""
    if isinstance(value, str):
        if not value.strip():
            return ()
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{key} must be a JSON list of tool definitions") from None
    if not isinstance(value, list | tuple):
        raise ConfigError(f"{key} must be a list of tool definitions, got {value!r}")
    for item in value:
        if not (
            isinstance(item, dict)
            and isinstance(item.get("type"), str)
            and isinstance(item.get("name"), str)
        ):
            raise ConfigError(f"{key}: each server tool needs a 'type' and a 'name', got {item!r}")
    return tuple(dict(item) for item in value)


#: Request parameters the relay itself sets: CLAUDE_EXTRA_PARAMS may not name them.
_RELAY_OWNS = {
    "messages": "the relay builds them from the conversation",
    "stream": "the relay always streams",
    "model": "use CLAUDE_MODEL and CLAUDE_ALLOWED_MODELS",
    "max_tokens": "use CLAUDE_MAX_TOKENS and CLAUDE_MAX_TOKENS_LIMIT",
    "system": "use CLAUDE_SYSTEM_PROMPT",
    "tools": "use @claude.tool and CLAUDE_SERVER_TOOLS",
    "thinking": "use CLAUDE_THINKING",
}


def _extra_params(key: str, value: Any) -> dict[str, Any]:
    """Request parameters merged into every upstream request, as JSON or a dict: what the
    API has and this project does not model (``output_config``, ``service_tier``, ...)."""
    if isinstance(value, str):
        if not value.strip():
            return {}
        try:
            value = json.loads(value)
        except ValueError:
            raise ConfigError(f"{key} must be a JSON object of request parameters") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be an object of request parameters, got {value!r}")
    for name in value:
        if name in _RELAY_OWNS:
            raise ConfigError(f"{key} may not set {name!r}: {_RELAY_OWNS[name]}")
    return dict(value)


def _betas(key: str, value: Any) -> tuple[str, ...]:
    names = _models(key, value)
    for name in names:
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
            raise ConfigError(f"{key}: {name!r} is not a beta name")
    return names


#: The redis-py a Redis Cluster store was checked on: 5.2's cluster client loses a remote
#: read and leaks nodes while slots migrate (tests/test_redis_cluster.py), 8.1's does not.
CLUSTER_REDIS_PY = (8, 1)


def cluster_refusal(version: str | None) -> str | None:
    """Why a Redis Cluster store cannot run on redis-py ``version`` (None: it can)."""
    if version is None:
        return "a Redis Cluster needs redis-py: pip install 'quart-claude[redis]'"
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    if parts < CLUSTER_REDIS_PY:
        wanted = ".".join(map(str, CLUSTER_REDIS_PY))
        return (
            f"a Redis Cluster needs redis-py {wanted} or later (installed: {version}): "
            f"pip install 'redis>={wanted}'"
        )
    return None


def _installed(distribution: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _store_url(key: str, value: Any) -> str:
    text = _str(key, value).strip()
    if text in ("", "memory"):
        return "memory"
    if text.startswith(("redis://", "rediss://", "unix://")):
        return text
    if text.startswith("redis+sentinel://"):
        parts = urlsplit(text)
        hosts = parts.netloc.rpartition("@")[2].split(",")
        if not all(re.fullmatch(r"[^:/]+:\d+", host) for host in hosts) or not parts.path.strip(
            "/"
        ):
            raise ConfigError(
                f"{key}: a Sentinel URL names the sentinels and the service, "
                "redis+sentinel://host:port,host:port/mymaster"
            )
        return text
    if text.startswith(("redis+cluster://", "rediss+cluster://")):
        hosts = urlsplit(text).netloc.rpartition("@")[2].split(",")
        if not all(re.fullmatch(r"[^:/]+:\d+", host) for host in hosts):
            raise ConfigError(f"{key}: a cluster URL names its nodes, host:port,host:port")
        refusal = cluster_refusal(_installed("redis"))
        if refusal:
            raise ConfigError(f"{key}: {refusal}")
        return text
    raise ConfigError(
        f"{key} must be 'memory', a redis:// (rediss://, unix://) URL, a Redis Cluster's "
        "redis+cluster://host:port,host:port or redis+sentinel://host:port,host:port/service"
    )


def _database_url(key: str, value: Any) -> str | None:
    text = _optional_str(key, value)
    if text is None:
        return None
    if not text.startswith(("sqlite+aiosqlite:", "postgresql+asyncpg:", "postgresql+psycopg:")):
        raise ConfigError(
            f"{key} must be an async SQLAlchemy URL: sqlite+aiosqlite:///path.db, "
            "postgresql+asyncpg://... or postgresql+psycopg://..."
        )
    return text


def _provider(key: str, value: Any) -> str:
    from .providers import PROVIDERS

    text = _str(key, value).strip().lower()
    if text not in PROVIDERS:
        raise ConfigError(f"{key} must be one of {', '.join(PROVIDERS)}, got {value!r}")
    return text


def _server_fallbacks(key: str, value: Any) -> Any:
    from .fallback import parse_server_fallbacks

    try:
        return parse_server_fallbacks(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _fallbacks(key: str, value: Any) -> tuple[Any, ...]:
    from .fallback import parse_fallbacks

    if value in (None, "", ()):
        return ()
    try:
        return parse_fallbacks(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _fallback_on(key: str, value: Any) -> frozenset[str]:
    from .fallback import parse_fallback_on

    try:
        return parse_fallback_on(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _percent(key: str, value: Any) -> int:
    number = _non_negative_int(key, value)
    if number > 100:
        raise ConfigError(f"{key} must be a percentage from 0 to 100, got {value!r}")
    return number


def _budget(key: str, value: Any) -> tuple[Any, ...]:
    from .budget import parse_budget

    if value in (None, "", ()):
        return ()
    try:
        return parse_budget(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _prices(key: str, value: Any) -> dict[str, Any]:
    from .prices import parse_prices

    if value in (None, ""):
        return dict(PRICES)
    try:
        return parse_prices(key, value)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def _context_strategy(key: str, value: Any) -> str:
    text = _str(key, value).strip().lower()
    if text not in ("none", "clear_tool_uses", "compact"):
        raise ConfigError(f"{key} must be 'none', 'clear_tool_uses' or 'compact', got {value!r}")
    return text


def _guard_mode(key: str, value: Any) -> str:
    from .guards import parse_guard_mode

    return parse_guard_mode(key, _str(key, value))


def _days(key: str, value: Any) -> float:
    return _seconds(key, value)  # the same rules: a non-negative finite number


@dataclass(frozen=True, slots=True)
class _Key:
    parse: Callable[[str, Any], Any]
    default: Any
    env_fallback: str | None = None  # a second environment variable consulted last


# Attribute name -> how to read it. The config key is "CLAUDE_" + name.upper().
_KEYS: dict[str, _Key] = {
    "api_key": _Key(_optional_str, None, env_fallback="ANTHROPIC_API_KEY"),
    "base_url": _Key(_optional_str, None, env_fallback="ANTHROPIC_BASE_URL"),
    "api_tokens": _Key(_models, ()),
    "provider": _Key(_provider, "anthropic"),
    "region": _Key(_optional_str, None),
    "project": _Key(_optional_str, None),
    "resource": _Key(_optional_str, None),
    "workspace_id": _Key(_optional_str, None),
    "model": _Key(_non_empty_str, DEFAULT_MODEL),
    "allowed_models": _Key(_models, ()),
    "allow_client_system": _Key(_bool, False),
    "max_tokens": _Key(_positive_int, 1024),
    "max_tokens_limit": _Key(_positive_int, 8192),
    "system_prompt": _Key(_str, "You are a helpful assistant."),
    "cache_system_prompt": _Key(_bool, False),
    "cache_conversation": _Key(_bool, False),
    "url_prefix": _Key(_url_prefix, ""),
    "timeout": _Key(_positive_seconds, 60.0),
    "connect_timeout": _Key(_positive_seconds, 10.0),
    "heartbeat_interval": _Key(_positive_seconds, 15.0),
    "send_timeout": _Key(_seconds, 60.0),
    "max_retries": _Key(_non_negative_int, 3),
    "retry_base_delay": _Key(_seconds, 1.0),
    "retry_max_delay": _Key(_seconds, 30.0),
    "recovery": _Key(_bool, True),
    "max_recoveries": _Key(_non_negative_int, 2),
    "max_body_size": _Key(_positive_int, 1024 * 1024),
    "allow_url_sources": _Key(_bool, True),
    "max_concurrent_streams": _Key(_positive_int, 1000),
    "shutdown_grace": _Key(_seconds, 5.0),
    "resume_grace": _Key(_seconds, 30.0),
    "max_takeovers": _Key(_non_negative_int, 2),
    "stream_lease": _Key(_positive_seconds, 3.0),
    "stream_ttl": _Key(_seconds, 300.0),
    "stream_store": _Key(_store_url, "memory"),
    "max_finished_streams": _Key(_positive_int, 10_000),
    "max_finished_bytes": _Key(_positive_int, 256 * 1024 * 1024),
    "max_streams_per_client": _Key(_non_negative_int, 20),
    "rate_limit": _Key(_rate_limit, ()),
    "cors_origins": _Key(_models, ()),
    "handle_signals": _Key(_bool, True),
    "http_client": _Key(_http_client, "auto"),
    "thinking": _Key(_thinking, "off"),
    "max_tool_steps": _Key(_positive_int, 8),
    "tool_timeout": _Key(_positive_seconds, 30.0),
    "server_tools": _Key(_server_tools, ()),
    "extra_params": _Key(_extra_params, {}),
    "betas": _Key(_betas, ()),
    "expose_thinking": _Key(_bool, True),
    "sse_retry": _Key(_non_negative_int, 1000),
    "metrics": _Key(_bool, True),
    "metrics_auth": _Key(_bool, True),
    "database_url": _Key(_database_url, None),
    "conversation_ttl": _Key(_days, 0.0),
    "context_strategy": _Key(_context_strategy, "none"),
    "fallbacks": _Key(_fallbacks, ()),
    "fallback_on": _Key(_fallback_on, DEFAULT_ON),
    "max_fallbacks": _Key(_non_negative_int, 2),
    "fallback_cooldown": _Key(_seconds, 30.0),
    "server_fallbacks": _Key(_server_fallbacks, None),
    "budget": _Key(_budget, ()),
    "budget_warn_at": _Key(_percent, 80),
    "budget_hold_ttl": _Key(_positive_seconds, 600.0),
    "ledger": _Key(_auto_bool, None),
    "prices": _Key(_prices, PRICES),
    "output_guard_every": _Key(_positive_int, 200),
    "output_guard_mode": _Key(_guard_mode, "cut"),
    "guard_timeout": _Key(_positive_seconds, 10.0),
}


@dataclass(frozen=True, slots=True)
class ClaudeConfig:
    """The resolved configuration of one app. ``api_key`` never appears in ``repr``."""

    api_key: str | None = field(repr=False)
    base_url: str | None
    api_tokens: tuple[str, ...] = field(repr=False)
    provider: str  # where Claude runs: anthropic, bedrock, bedrock-mantle, vertex, ...
    region: str | None  # the provider's region (AWS, Vertex) or location (Google Cloud)
    project: str | None  # Vertex AI, Claude Platform on Google Cloud
    resource: str | None  # Microsoft Foundry
    workspace_id: str | None  # Claude Platform on AWS and on Google Cloud
    model: str
    allowed_models: tuple[str, ...]
    allow_client_system: bool
    max_tokens: int
    max_tokens_limit: int
    system_prompt: str
    cache_system_prompt: bool
    cache_conversation: bool
    url_prefix: str
    timeout: float
    connect_timeout: float
    heartbeat_interval: float
    send_timeout: float
    max_retries: int
    retry_base_delay: float
    retry_max_delay: float
    recovery: bool
    max_recoveries: int
    max_body_size: int
    allow_url_sources: bool
    max_concurrent_streams: int
    shutdown_grace: float
    resume_grace: float
    max_takeovers: int
    stream_lease: float  # Redis: how long a silent producer holds its streams
    stream_ttl: float
    stream_store: str
    max_finished_streams: int
    max_finished_bytes: int
    max_streams_per_client: int
    rate_limit: tuple[Any, ...]  # limits.RateLimitItem
    cors_origins: tuple[str, ...]
    handle_signals: bool
    http_client: str
    thinking: str | int  # "off", "adaptive", or a budget in tokens
    max_tool_steps: int
    tool_timeout: float
    server_tools: tuple[dict[str, Any], ...]
    extra_params: dict[str, Any]  # merged into every upstream request (operator only)
    betas: tuple[str, ...]  # the anthropic-beta header
    expose_thinking: bool
    sse_retry: int
    metrics: bool
    metrics_auth: bool
    database_url: str | None = field(repr=False)  # it may hold a password
    conversation_ttl: float  # days; 0: kept until deleted
    context_strategy: str  # "none", "clear_tool_uses" or "compact"
    fallbacks: tuple[Any, ...]  # fallback.Hop: the models after the requested one
    fallback_on: frozenset[str]  # the error classes that move to the next hop
    max_fallbacks: int  # hops an answer may move, at most
    fallback_cooldown: float  # seconds a hop that failed is skipped
    #: the API's own fallbacks for refusals ("default" or entries), on platforms that run them
    server_fallbacks: str | tuple[dict[str, Any], ...] | None
    budget: tuple[Any, ...]  # budget.Limit: the default per identity (none: unlimited)
    budget_warn_at: int  # percent of a limit used past which start and done warn (0: off)
    budget_hold_ttl: float  # seconds a reservation outlives a worker killed while holding it
    #: record every upstream request's usage: None (auto) where the database or Redis keeps
    #: it, or with a budget; True also in this worker's memory; False only with a budget
    ledger: bool | None
    prices: dict[str, Any]  # prices.Price by model: the shipped table and CLAUDE_PRICES
    output_guard_every: int  # characters of new text between two output guard calls
    output_guard_mode: str  # "cut": text flows, a block cuts; "hold": text waits for the guard
    guard_timeout: float  # seconds a guard may take before it fails closed

    @staticmethod
    def key(name: str) -> str:
        """The public config key of an attribute: ``max_retries`` -> ``CLAUDE_MAX_RETRIES``."""
        return "CLAUDE_" + name.upper()


assert {f.name for f in fields(ClaudeConfig)} == set(_KEYS), "config keys and fields disagree"


def _check_provider(config: ClaudeConfig) -> None:
    """A provider setting the provider does not read is a mistake, not something to ignore."""
    from .providers import SETTINGS

    for name in ("region", "project", "resource", "workspace_id"):
        if getattr(config, name) is not None and name not in SETTINGS[config.provider]:
            raise ConfigError(
                f"{ClaudeConfig.key(name)} is not read by CLAUDE_PROVIDER={config.provider}"
            )


def load_config(
    options: Mapping[str, Any],
    app_config: Mapping[str, Any],
    environ: Mapping[str, str] | None = None,
) -> ClaudeConfig:
    """Resolve each key: keyword option, then ``app.config``, then the environment, then default."""
    env = os.environ if environ is None else environ
    unknown = set(options) - set(_KEYS)
    if unknown:
        raise ConfigError(f"unknown Claude option(s): {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name, spec in _KEYS.items():
        key = ClaudeConfig.key(name)
        if options.get(name) is not None:
            raw = options[name]
        elif app_config.get(key) is not None:
            raw = app_config[key]
        elif key in env:
            raw = env[key]
        elif spec.env_fallback and spec.env_fallback in env:
            raw = env[spec.env_fallback]
        else:
            values[name] = spec.default
            continue
        values[name] = spec.parse(key, raw)
    config = ClaudeConfig(**values)
    _check_provider(config)
    if config.max_tokens > config.max_tokens_limit:
        raise ConfigError(
            f"CLAUDE_MAX_TOKENS ({config.max_tokens}) exceeds "
            f"CLAUDE_MAX_TOKENS_LIMIT ({config.max_tokens_limit})"
        )
    if config.retry_base_delay > config.retry_max_delay:
        raise ConfigError(
            f"CLAUDE_RETRY_BASE_DELAY ({config.retry_base_delay}) exceeds "
            f"CLAUDE_RETRY_MAX_DELAY ({config.retry_max_delay})"
        )
    return config
