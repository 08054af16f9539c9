"""Where Claude runs: the first-party API, or a cloud's (``CLAUDE_PROVIDER``).

The first-party API is sent by :mod:`.first_party` (aiohttp, no SDK). Each cloud provider is
the anthropic SDK's own client for it (``AsyncAnthropicBedrock`` and so on), built with
``max_retries=0`` on one shared HTTP client; ``CLAUDE_HTTP_CLIENT=httpx`` puts the first-party
API on the SDK too. Credentials come only from each platform's standard chain, read by that
client or its auth library (boto3, google-auth, an Azure token provider, the provider's API
key variable): nothing here stores one. An :class:`Endpoint` names one provider with its
settings; the relay keeps one :class:`Upstream` (how it sends, and its framing) per endpoint
a chain reaches.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .config_error import ConfigError
from .first_party import FirstPartyClient, UpstreamResponse
from .framing import EventStreamFramer, Framer, UpstreamFramer
from .model_ids import canonical_model

if TYPE_CHECKING:  # config reads this module's PROVIDERS: it is imported where it is used
    import httpx2

    from .config import ClaudeConfig

# The SDK (a second of import, most of it its types) is imported where a client is built, at
# startup: importing quart_claude, or reading its config, does not pay for it.

__all__ = [
    "CREDENTIAL_ENV",
    "PROVIDERS",
    "SETTING_FIELDS",
    "Endpoint",
    "Upstream",
    "Upstreams",
    "canonical_model",
    "endpoints",
    "make_upstream",
    "missing_api_key",
    "primary_endpoint",
    "require_extra",
]

#: every ``CLAUDE_PROVIDER`` value, and the extra its client needs (None: none)
PROVIDERS: dict[str, str | None] = {
    "anthropic": None,
    "bedrock": "bedrock",
    "bedrock-mantle": "bedrock",
    "vertex": "vertex",
    "foundry": None,
    "aws": "aws",
    "google-cloud": "google-cloud",
}
#: the module each extra brings (checked at startup, so a missing one fails loudly)
_EXTRA_MODULES = {
    "bedrock": "botocore",
    "aws": "botocore",
    "vertex": "google.auth",
    "google-cloud": "google.auth",
}

#: the environment variables the providers' credential chains read secrets from: each value
#: is redacted from every log line and response (an upstream may echo what it was sent)
CREDENTIAL_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_BEARER_TOKEN_BEDROCK",
    "ANTHROPIC_AWS_API_KEY",
    "ANTHROPIC_FOUNDRY_API_KEY",
    "AZURE_CLIENT_SECRET",
)

#: a provider's settings (config keys ``CLAUDE_REGION`` and so on; fields of a hop)
SETTING_FIELDS = ("region", "project", "resource", "workspace_id", "base_url")
#: the settings a provider reads (the others are refused, so a typo is not ignored)
SETTINGS: dict[str, frozenset[str]] = {
    "anthropic": frozenset({"base_url"}),
    "bedrock": frozenset({"region", "base_url"}),
    "bedrock-mantle": frozenset({"region", "base_url"}),
    "vertex": frozenset({"region", "project", "base_url"}),
    "foundry": frozenset({"resource", "base_url"}),
    "aws": frozenset({"region", "workspace_id", "base_url"}),
    "google-cloud": frozenset({"region", "project", "workspace_id", "base_url"}),
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One provider and its settings: where a hop's requests go."""

    provider: str = "anthropic"
    region: str | None = None  # AWS region; Vertex region; Google Cloud location
    project: str | None = None  # Vertex AI and Claude Platform on Google Cloud
    resource: str | None = None  # Microsoft Foundry's resource name
    workspace_id: str | None = None  # Claude Platform on AWS and on Google Cloud
    base_url: str | None = None  # None: the provider's own (or its SDK's environment variable)

    @property
    def key(self) -> str:
        """A stable name for metrics, cooldowns and logs (no secret is ever part of it)."""
        where = self.region or self.resource or ""
        return f"{self.provider}/{where}" if where else self.provider

    @classmethod
    def parse(cls, key: str, item: dict[str, Any]) -> Endpoint:
        """An endpoint from a hop's fields (``provider`` and its settings)."""
        provider = item.get("provider", "anthropic")
        if provider not in PROVIDERS:
            raise ValueError(
                f"{key}: provider must be one of {sorted(PROVIDERS)}, got {provider!r}"
            )
        given = {name: item[name] for name in SETTING_FIELDS if item.get(name) is not None}
        wrong = set(given) - SETTINGS[provider]
        if wrong:
            raise ValueError(f"{key}: provider {provider!r} takes no {sorted(wrong)}")
        for name, value in given.items():
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"{key}: {name} must be a non-empty string")
        return cls(provider, **given)


SdkClient = Any  # one of the SDK's async clients: each has .messages, none is a subclass
#: how an endpoint sends a request's parameters: an open streamed response (or its error)
Sender = Callable[[Mapping[str, Any]], AbstractAsyncContextManager[UpstreamResponse]]


@dataclass(frozen=True, slots=True)
class Upstream:
    """One endpoint: how its requests are sent, and the framing of its streamed responses."""

    endpoint: Endpoint
    open: Sender
    framer: Callable[[int], Framer]
    #: what the platform's body must carry beyond the SDK's (its documented API version:
    #: the legacy Bedrock endpoint refuses the SDK's default on some models)
    body: dict[str, Any] = field(default_factory=dict)

    betas: tuple[str, ...] = ()  # what the platform's features add to ``anthropic-beta``

    def params(self, params: dict[str, Any]) -> dict[str, Any]:
        """A request's parameters as this endpoint takes them."""
        if not self.body:
            return params
        params = {**params, "extra_body": {**params.get("extra_body", {}), **self.body}}
        if self.betas:
            headers = dict(params.get("extra_headers") or {})
            betas = [b for b in headers.get("anthropic-beta", "").split(",") if b]
            headers["anthropic-beta"] = ",".join(dict.fromkeys([*betas, *self.betas]))
            params["extra_headers"] = headers
        return params


def primary_endpoint(config: ClaudeConfig) -> Endpoint:
    """The app's own endpoint: ``CLAUDE_PROVIDER`` and its settings."""
    return Endpoint(
        config.provider,
        region=config.region,
        project=config.project,
        resource=config.resource,
        workspace_id=config.workspace_id,
        base_url=config.base_url,
    )


def endpoints(config: ClaudeConfig) -> list[Endpoint]:
    """Every endpoint the app's requests may reach: its own, then its hops' (in order)."""
    primary = primary_endpoint(config)
    return [primary, *(hop.endpoint or primary for hop in config.fallbacks)]


class UpstreamSource(Protocol):
    """Where the relay sends each endpoint's requests: :class:`Upstreams`, or a test's own."""

    def __getitem__(self, endpoint: Endpoint) -> Upstream: ...

    async def close(self) -> None: ...


class Upstreams:
    """How every endpoint the app's requests may reach is sent to (its own, and its fallback
    hops'). The first-party API goes on :class:`FirstPartyClient` (aiohttp, no SDK) unless
    ``CLAUDE_HTTP_CLIENT=httpx``; the clouds go through the SDK's clients, all on one HTTP
    client made only if one is needed: one pool, one TLS context each."""

    def __init__(self, config: ClaudeConfig) -> None:
        self._config = config
        self._first_party: dict[str | None, FirstPartyClient] = {}  # by base URL
        self._sdk_http: httpx2.AsyncClient | None = None
        self._by_endpoint = {e: self._upstream(e) for e in dict.fromkeys(endpoints(config))}

    def __getitem__(self, endpoint: Endpoint) -> Upstream:
        return self._by_endpoint[endpoint]

    def _upstream(self, endpoint: Endpoint) -> Upstream:
        config = self._config
        if endpoint.provider == "anthropic" and _on_aiohttp(config.http_client):
            client = self._first_party.get(endpoint.base_url)
            if client is None:
                client = self._first_party[endpoint.base_url] = _first_party(config, endpoint)
            return _upstream(endpoint, client.open, config.server_fallbacks)
        if self._sdk_http is None:
            self._sdk_http = _sdk_http_client(config)
        return make_upstream(endpoint, config.api_key, self._sdk_http, config.server_fallbacks)

    async def close(self) -> None:
        for client in self._first_party.values():
            await client.close()
        if self._sdk_http is not None:
            await self._sdk_http.aclose()


def _on_aiohttp(choice: str) -> bool:
    """Whether the upstream goes on aiohttp (``CLAUDE_HTTP_CLIENT``: ``auto`` when it is
    installed, ``aiohttp`` or a :class:`ConfigError`, never with ``httpx``): the first-party
    API on :mod:`.first_party`, the clouds on the SDK's aiohttp transport."""
    if choice == "httpx":
        return False
    if importlib.util.find_spec("aiohttp") is not None:
        return True
    if choice == "aiohttp":
        raise ConfigError("CLAUDE_HTTP_CLIENT=aiohttp needs aiohttp: pip install aiohttp")
    return False


def _first_party(config: ClaudeConfig, endpoint: Endpoint) -> FirstPartyClient:
    from .._version import __version__

    if not config.api_key:
        raise missing_api_key()
    return FirstPartyClient(
        config.api_key,
        endpoint.base_url,
        timeout=config.timeout,
        connect_timeout=config.connect_timeout,
        max_connections=_max_connections(config),
        user_agent=f"quart-claude/{__version__}",
    )


def _max_connections(config: ClaudeConfig) -> int:
    """A pool holds one connection per allowed concurrent stream, and some to spare."""
    return config.max_concurrent_streams + 16


def _sdk_http_client(config: ClaudeConfig) -> httpx2.AsyncClient:
    """The SDK's transport (the clouds, or everything with ``httpx``): aiohttp when chosen
    (a quarter less CPU per relayed event than its httpx2 default, the same behaviour under
    every fault)."""
    import anthropic  # at startup, and only for an endpoint that needs it
    import httpx2

    timeout = httpx2.Timeout(config.timeout, connect=config.connect_timeout)
    limits = httpx2.Limits(max_connections=_max_connections(config), max_keepalive_connections=100)
    if _on_aiohttp(config.http_client):
        return anthropic.DefaultAioHttpClient(timeout=timeout, limits=limits)
    return anthropic.DefaultAsyncHttpxClient(timeout=timeout, limits=limits)


def missing_api_key() -> Exception:
    """The :class:`ConfigError` of a first-party endpoint without an API key."""

    return ConfigError(
        "CLAUDE_API_KEY is not set (nor ANTHROPIC_API_KEY): set one, or point "
        "CLAUDE_BASE_URL at the emulator (quart_claude.testing) with any key"
    )


def _sdk_open(client: SdkClient) -> Sender:
    """An SDK client's streamed ``create``: its HTTP errors are the SDK's to raise."""
    create = client.messages.with_streaming_response.create

    @asynccontextmanager
    async def open(params: Mapping[str, Any]) -> AsyncIterator[UpstreamResponse]:
        async with create(**params) as response:
            yield UpstreamResponse(response.request_id, response.http_response.aiter_bytes())

    return open


def require_extra(endpoint: Endpoint) -> None:
    """A :class:`ConfigError` when the provider's client lacks the library it signs with."""

    extra = PROVIDERS[endpoint.provider]
    module = _EXTRA_MODULES.get(extra or "")
    if module is not None and importlib.util.find_spec(module.split(".")[0]) is None:
        raise ConfigError(
            f"CLAUDE_PROVIDER={endpoint.provider} needs its SDK extra: "
            f"pip install 'quart-claude[{extra}]'"
        )


def make_upstream(
    endpoint: Endpoint,
    api_key: str | None,
    http: httpx2.AsyncClient,
    server_fallbacks: Any = None,
) -> Upstream:
    """The endpoint's client on the shared HTTP client, or a :class:`ConfigError` that names
    what is missing (an extra, a setting, a credential)."""
    import anthropic

    require_extra(endpoint)
    build = _BUILDERS[endpoint.provider]
    try:
        client = build(endpoint, api_key, http)
    except ConfigError:
        raise
    except (ValueError, anthropic.AnthropicError) as exc:  # the SDK says what it lacks
        raise ConfigError(f"CLAUDE_PROVIDER={endpoint.provider}: {exc}") from None
    return _upstream(endpoint, _sdk_open(client), server_fallbacks)


def _upstream(endpoint: Endpoint, send: Sender, server_fallbacks: Any) -> Upstream:
    """An endpoint's upstream: its framing, and what its platform adds to each body."""
    framer: Callable[[int], Framer] = (
        EventStreamFramer if endpoint.provider == "bedrock" else UpstreamFramer
    )
    body: dict[str, Any] = dict(_BODIES.get(endpoint.provider, {}))
    betas: tuple[str, ...] = ()
    if server_fallbacks is not None and endpoint.provider in SERVER_FALLBACK_PROVIDERS:
        body["fallbacks"] = (
            server_fallbacks
            if server_fallbacks == "default"
            else [dict(entry) for entry in server_fallbacks]
        )
        betas = (SERVER_FALLBACK_BETA,)
    return Upstream(endpoint, send, framer, body, betas)


def _common(endpoint: Endpoint, http: httpx2.AsyncClient) -> dict[str, Any]:
    return {"base_url": endpoint.base_url, "max_retries": 0, "http_client": http}


def _anthropic(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    if not api_key:
        raise missing_api_key()
    return anthropic.AsyncAnthropic(api_key=api_key, **_common(endpoint, http))


def _bedrock(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    # boto3's chain signs (SigV4), or AWS_BEARER_TOKEN_BEDROCK, read by the SDK, is a bearer
    return anthropic.AsyncAnthropicBedrock(aws_region=endpoint.region, **_common(endpoint, http))


def _mantle(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    return anthropic.AsyncAnthropicBedrockMantle(
        aws_region=endpoint.region, **_common(endpoint, http)
    )


def _vertex(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    # google-auth's Application Default Credentials, refreshed by the SDK in a thread
    options = _common(endpoint, http)
    if endpoint.region is not None:
        options["region"] = endpoint.region
    if endpoint.project is not None:
        options["project_id"] = endpoint.project
    return anthropic.AsyncAnthropicVertex(**options)


def _foundry(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    options = _common(endpoint, http)
    if endpoint.base_url is None:
        del options["base_url"]  # the SDK refuses a base_url beside a resource
        options["resource"] = endpoint.resource
    if not os.environ.get("ANTHROPIC_FOUNDRY_API_KEY"):  # else Entra ID, when installed
        options["azure_ad_token_provider"] = _entra_token_provider()
    return anthropic.AsyncAnthropicFoundry(**options)


def _entra_token_provider() -> Callable[[], Any]:

    if (
        importlib.util.find_spec("azure") is None
        or importlib.util.find_spec("azure.identity") is None
    ):
        raise ConfigError(
            "CLAUDE_PROVIDER=foundry needs ANTHROPIC_FOUNDRY_API_KEY, or azure-identity for an "
            "Entra ID token: pip install 'quart-claude[foundry]'"
        )
    from azure.identity.aio import (  # type: ignore[import-not-found,unused-ignore]
        DefaultAzureCredential,
        get_bearer_token_provider,
    )

    provider: Callable[[], Any] = get_bearer_token_provider(
        DefaultAzureCredential(), "https://ai.azure.com/.default"
    )
    return provider


def _aws(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    return anthropic.AsyncAnthropicAWS(
        aws_region=endpoint.region, workspace_id=endpoint.workspace_id, **_common(endpoint, http)
    )


def _google_cloud(endpoint: Endpoint, api_key: str | None, http: httpx2.AsyncClient) -> SdkClient:
    import anthropic

    return anthropic.AsyncAnthropicGoogleCloud(
        project=endpoint.project,
        location=endpoint.region,
        workspace_id=endpoint.workspace_id,
        **_common(endpoint, http),
    )


#: the API's server-side fallback for refusals (CLAUDE_SERVER_FALLBACKS): its beta, and the
#: platforms that run the first-party API (and so offer it)
SERVER_FALLBACK_BETA = "server-side-fallback-2026-07-01"
SERVER_FALLBACK_PROVIDERS = frozenset({"anthropic", "aws", "google-cloud"})

_BODIES = {
    "bedrock": {"anthropic_version": "bedrock-2023-05-31"},
    "vertex": {"anthropic_version": "vertex-2023-10-16"},
}

_BUILDERS: dict[str, Callable[[Endpoint, str | None, httpx2.AsyncClient], SdkClient]] = {
    "anthropic": _anthropic,
    "bedrock": _bedrock,
    "bedrock-mantle": _mantle,
    "vertex": _vertex,
    "foundry": _foundry,
    "aws": _aws,
    "google-cloud": _google_cloud,
}
