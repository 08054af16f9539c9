from __future__ import annotations

from typing import Any

import pytest
from quart import Quart

from quart_claude import DEFAULT_MODEL, Claude, ConfigError

pytestmark = pytest.mark.core

KEY = "sk-test-key-for-config-0000000000"


def make(
    monkeypatch: pytest.MonkeyPatch | None = None,
    env: dict[str, str] | None = None,
    config: dict[str, object] | None = None,
    **options: Any,
) -> Quart:
    app = Quart(__name__)
    for name, value in (env or {}).items():
        assert monkeypatch is not None
        monkeypatch.setenv(name, value)
    app.config.update(config or {})
    Claude(app, **options)
    return app


def test_defaults() -> None:
    config = Claude.state(make(api_key=KEY)).config
    assert config.model == DEFAULT_MODEL
    assert (config.max_tokens, config.max_tokens_limit) == (1024, 8192)
    assert config.system_prompt == "You are a helpful assistant."
    assert (config.url_prefix, config.timeout, config.heartbeat_interval) == ("", 60.0, 15.0)
    assert (config.max_retries, config.retry_base_delay, config.retry_max_delay) == (3, 1.0, 30.0)


def test_precedence_option_over_app_config_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"CLAUDE_MAX_RETRIES": "7", "CLAUDE_MODEL": "claude-env", "CLAUDE_TIMEOUT": "11"}
    app = make(
        monkeypatch,
        env=env,
        config={"CLAUDE_API_KEY": KEY, "CLAUDE_MAX_RETRIES": 5, "CLAUDE_MODEL": "claude-app"},
        model="claude-option",
    )
    config = Claude.state(app).config
    assert config.model == "claude-option"  # option beats app.config and env
    assert config.max_retries == 5  # app.config beats env
    assert config.timeout == 11.0  # env beats the default


def test_env_only(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "CLAUDE_API_KEY": KEY,
        "CLAUDE_MAX_TOKENS": "256",
        "CLAUDE_RECOVERY": "false",
        "CLAUDE_URL_PREFIX": "/ai",
        "CLAUDE_RETRY_BASE_DELAY": "0.25",
    }
    config = Claude.state(make(monkeypatch, env=env)).config
    assert config.api_key == KEY
    assert config.max_tokens == 256
    assert config.recovery is False
    assert config.url_prefix == "/ai"
    assert config.retry_base_delay == 0.25


def test_anthropic_env_fallbacks(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"ANTHROPIC_API_KEY": KEY, "ANTHROPIC_BASE_URL": "http://127.0.0.1:9"}
    config = Claude.state(make(monkeypatch, env=env)).config
    assert (config.api_key, config.base_url) == (KEY, "http://127.0.0.1:9")
    monkeypatch.setenv("CLAUDE_API_KEY", "sk-claude-wins")
    assert Claude.state(make()).config.api_key == "sk-claude-wins"


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CLAUDE_MAX_RETRIES", "abc"),
        ("CLAUDE_MAX_RETRIES", "-1"),
        ("CLAUDE_TIMEOUT", "-5"),
        ("CLAUDE_TIMEOUT", "0"),
        ("CLAUDE_TIMEOUT", "nan"),
        ("CLAUDE_HEARTBEAT_INTERVAL", "soon"),
        ("CLAUDE_MAX_TOKENS", "0"),
        ("CLAUDE_MAX_TOKENS", "1.5"),
        ("CLAUDE_RECOVERY", "maybe"),
        ("CLAUDE_OUTPUT_GUARD_MODE", "sometimes"),
        ("CLAUDE_OUTPUT_GUARD_EVERY", "0"),
        ("CLAUDE_GUARD_TIMEOUT", "0"),
        ("CLAUDE_URL_PREFIX", "ai/"),
        ("CLAUDE_MODEL", " "),
        ("CLAUDE_RETRY_MAX_DELAY", "-1"),
    ],
)
def test_bad_env_value_fails_at_init_naming_the_key(
    monkeypatch: pytest.MonkeyPatch, key: str, value: str
) -> None:
    monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=key):
        make(api_key=KEY)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("CLAUDE_MAX_RETRIES", True),
        ("CLAUDE_TIMEOUT", "x"),
        ("CLAUDE_MAX_TOKENS", 10**6),
        ("CLAUDE_SYSTEM_PROMPT", 42),
    ],
)
def test_bad_app_config_value_fails_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError, match=key):
        make(config={key: value}, api_key=KEY)


def test_unknown_option_is_an_error() -> None:
    with pytest.raises(ConfigError, match="max_retry"):
        make(api_key=KEY, max_retry=3)


def test_missing_api_key_fails_fast() -> None:
    with pytest.raises(ConfigError, match="CLAUDE_API_KEY"):
        make()


def test_double_registration_is_refused() -> None:
    app = make(api_key=KEY)
    with pytest.raises(RuntimeError, match="already registered"):
        Claude(api_key=KEY).init_app(app)


def test_factory_pattern_keeps_state_per_app() -> None:
    claude = Claude(api_key=KEY)
    first, second = Quart("first"), Quart("second")
    first.config["CLAUDE_MODEL"] = "claude-a"
    second.config["CLAUDE_MODEL"] = "claude-b"
    claude.init_app(first)
    claude.init_app(second)
    assert Claude.state(first).config.model == "claude-a"
    assert Claude.state(second).config.model == "claude-b"
    assert not hasattr(claude, "app")


def test_state_of_an_app_without_the_extension_explains() -> None:
    with pytest.raises(RuntimeError, match="init_app"):
        Claude.state(Quart(__name__))


def test_api_key_not_in_repr() -> None:
    config = Claude.state(make(api_key=KEY)).config
    assert KEY not in repr(config)
    assert "model=" in repr(config)


def test_url_prefix_and_prefixed_endpoint_names() -> None:
    app = make(api_key=KEY, url_prefix="/ai")
    rules = {
        rule.rule: rule.endpoint
        for rule in app.url_map.iter_rules()
        if "method_not_allowed" not in rule.endpoint  # the JSON 405 answers
    }
    assert rules["/ai/chat/stream"] == "claude.chat_stream"
    assert rules["/ai/health"] == "claude.health"
    assert rules["/ai/ready"] == "claude.ready"


def test_every_config_key_is_in_the_configuration_reference() -> None:
    """docs/configuration.md lists every CLAUDE_* key the extension reads."""
    import dataclasses
    from pathlib import Path

    from quart_claude import ClaudeConfig

    reference = (Path(__file__).resolve().parent.parent / "docs" / "configuration.md").read_text()
    keys = [ClaudeConfig.key(f.name) for f in dataclasses.fields(ClaudeConfig)]
    missing = [key for key in keys if f"`{key}`" not in reference]
    assert not missing, f"not in docs/configuration.md: {missing}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ('{"max_tokens": 5}', r"CLAUDE_EXTRA_PARAMS may not set 'max_tokens'"),
        ('{"model": "x"}', r"CLAUDE_EXTRA_PARAMS may not set 'model'.*CLAUDE_MODEL"),
        ('{"messages": []}', r"CLAUDE_EXTRA_PARAMS may not set 'messages'"),
        ('{"stream": false}', r"CLAUDE_EXTRA_PARAMS may not set 'stream'"),
        ('{"system": "x"}', r"CLAUDE_SYSTEM_PROMPT"),
        ("[1]", r"CLAUDE_EXTRA_PARAMS must be an object"),
        ("{oops", r"CLAUDE_EXTRA_PARAMS must be a JSON object"),
    ],
)
def test_extra_params_may_not_take_what_the_relay_owns(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        make(monkeypatch, env={"CLAUDE_EXTRA_PARAMS": value}, api_key=KEY)


def test_betas_are_names() -> None:
    app = make(api_key=KEY, betas="a-2025-01-01, b-2026-02-02")
    assert Claude.state(app).config.betas == ("a-2025-01-01", "b-2026-02-02")
    with pytest.raises(ConfigError, match="CLAUDE_BETAS"):
        make(api_key=KEY, betas="bad name\r\nX-Injected: 1")


def test_the_store_refuses_a_sharded_redis_on_a_redis_py_older_than_checked() -> None:
    """redis-py 5.2's cluster client loses a remote read while slots migrate; the store
    refuses a cluster below 8.1, at init_app, naming the key and the fix. (The lowest-versions
    leg runs without the cluster tests, which this refusal stands for there.)"""
    from importlib.metadata import version

    from quart_claude._core.config import cluster_refusal

    assert cluster_refusal("8.1.0") is None and cluster_refusal("9.0.0b1") is None
    refused = cluster_refusal("5.2.0")
    assert refused is not None and "redis>=8.1" in refused and "5.2.0" in refused
    assert cluster_refusal(None) is not None
    url = "redis+cluster://127.0.0.1:7000,127.0.0.1:7001"
    if cluster_refusal(version("redis")) is None:
        Claude(Quart(__name__), api_key="sk-test", stream_store=url)
    else:
        with pytest.raises(ConfigError, match="CLAUDE_STREAM_STORE: a Redis Cluster needs"):
            Claude(Quart(__name__), api_key="sk-test", stream_store=url)
