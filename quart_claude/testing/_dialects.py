"""The emulator's provider dialects: each cloud's paths, the auth it checks, its framing
(classic Bedrock's AWS event stream, CRC-framed) and its error shapes, around the one
Messages API the emulator implements.

A request is recognised by its path (and, on the first-party path, a SigV4 signature for
Claude Platform on AWS), its credentials checked for presence and form (a SigV4
``Authorization`` made with any static keys, a bearer token, an API key), and its body
turned into the first-party shape, so everything else in the emulator is shared. The
recorded request keeps what the provider was sent (``RecordedRequest.sent``).
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import struct
import urllib.parse
import zlib
from dataclasses import dataclass
from typing import Any

__all__ = ["GOOGLE_TOKEN", "Dialect", "event_frame", "exception_frame", "recognise"]

#: the access token the emulator's OAuth endpoint (``POST /token``) hands out, and the one
#: Vertex AI and Google Cloud requests must carry
GOOGLE_TOKEN = "ya29.emulator-google-token"

_BEDROCK = re.compile(r"^/model/([^/]+)/(invoke|invoke-with-response-stream)$")
_VERTEX = re.compile(
    r"^/v1/projects/([^/]+)/locations/([^/]+)/publishers/anthropic/models/([^/:]+)"
    r":(rawPredict|streamRawPredict)$"
)
_GOOGLE_CLOUD = re.compile(
    r"^/v1/projects/[^/]+/locations/[^/]+/workspaces/[^/]+/invoke/v1/messages$"
)
_SIGV4 = re.compile(
    r"^AWS4-HMAC-SHA256 Credential=[A-Z0-9]{16,128}/\d{8}/[a-z0-9-]+/([a-z0-9-]+)/aws4_request, "
    r"SignedHeaders=[a-z0-9;-]+, Signature=[0-9a-f]{64}$"
)
_API_VERSION = re.compile(r"^20\d\d-\d\d-\d\d$")
_BEDROCK_ID = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.(claude-[a-z0-9.-]+?)(?:-v\d+(?::\d+)?)?$")


@dataclass(frozen=True, slots=True)
class Dialect:
    """Which provider a request came through, and what its path said."""

    name: str  # anthropic, bedrock, bedrock-mantle, vertex, foundry, aws, google-cloud, oauth
    model: str | None = None  # from the path (Bedrock, Vertex)
    stream: bool | None = None  # from the path (Bedrock, Vertex)

    @property
    def event_stream(self) -> bool:
        return self.name == "bedrock"

    def auth_problem(self, headers: dict[str, str], api_key: str | None) -> str | None:
        """Why the request's credentials are refused, or None."""
        authorization = headers.get("authorization", "")
        if self.name in ("bedrock", "bedrock-mantle", "aws"):
            service = {"bedrock": "bedrock", "bedrock-mantle": "bedrock-mantle"}.get(
                self.name, "aws-external-anthropic"
            )
            if authorization.startswith("Bearer ") and len(authorization) > 7:
                return None  # a Bedrock API key (AWS_BEARER_TOKEN_BEDROCK)
            signed = _SIGV4.match(authorization)
            if signed is None or "x-amz-date" not in headers:
                return "a SigV4 Authorization header (or a bearer API key) is required"
            if signed.group(1) != service:
                return f"signed for service {signed.group(1)!r}, not {service!r}"
            if self.name == "aws" and not headers.get("anthropic-workspace-id"):
                return "the anthropic-workspace-id header is required"
            return None
        if self.name in ("vertex", "google-cloud"):
            if authorization != f"Bearer {GOOGLE_TOKEN}":
                return "a Google OAuth access token is required"
            return None
        if self.name == "foundry":
            key = headers.get("api-key") or headers.get("x-api-key") or authorization[7:]
            if not key or (api_key is not None and key != api_key):
                return "an api-key header (or an Entra ID bearer token) is required"
            return None
        return None  # the first-party checks are the emulator's own

    def first_party(self, body: Any, headers: dict[str, str]) -> Any:
        """The request body as the first-party API takes it (model and stream in the body,
        betas in the header); problems are left for the emulator's validation."""
        if not isinstance(body, dict) or self.name not in ("bedrock", "vertex"):
            return body
        body = dict(body)
        version = body.pop("anthropic_version", None)
        expected = "bedrock-2023-05-31" if self.name == "bedrock" else "vertex-2023-10-16"
        # the platform's documented version; the SDK's own default only where it is taken
        # (the legacy Bedrock endpoint refuses it for a model named by its profile ARN)
        arn = (self.model or "").startswith("arn:")
        if version != expected and (arn or not _API_VERSION.match(str(version))):
            body["__problem"] = f"anthropic_version must be {expected!r}, got {version!r}"
        if "model" in body:
            body["__problem"] = "model: Extra inputs are not permitted (it is in the path)"
        assert self.model is not None
        body["model"] = _bedrock_model(self.model) if self.name == "bedrock" else self.model
        if self.name == "bedrock":
            if "stream" in body:
                body["__problem"] = "stream: Extra inputs are not permitted"
            body["stream"] = bool(self.stream)
            betas = body.pop("anthropic_beta", None)
            if isinstance(betas, list) and betas:
                headers["anthropic-beta"] = ",".join(str(beta) for beta in betas)
        return body

    def error(self, status: int, error_type: str, message: str) -> tuple[int, dict[str, str], Any]:
        """An error response as this provider sends it: ``(status, headers, JSON body)``, or
        the first-party shape (None body: the emulator's own)."""
        if self.name == "bedrock":
            name = error_type if error_type.endswith("Exception") else _AWS_BY_STATUS.get(status)
            name = name or "InternalServerException"
            status = _AWS_STATUS.get(name.lower(), status)
            headers = {
                "x-amzn-errortype": f"{name}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                "x-amzn-requestid": _request_id(),
            }
            return status, headers, {"message": message}
        if self.name == "vertex" and status in _GOOGLE_BY_STATUS:
            error = {"code": status, "message": message, "status": _GOOGLE_BY_STATUS[status]}
            # quota errors come as a one-item array (seen from Vertex AI), the rest as objects
            return status, {}, [{"error": error}] if status == 429 else {"error": error}
        return status, {}, None


_AWS_BY_STATUS = {
    400: "ValidationException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
    529: "ServiceUnavailableException",
}
_AWS_STATUS = {
    "validationexception": 400,
    "unrecognizedclientexception": 403,
    "accessdeniedexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 424,
    "modelstreamerrorexception": 424,
    "throttlingexception": 429,
    "servicequotaexceededexception": 429,
    "internalserverexception": 500,
    "serviceunavailableexception": 503,
}
_GOOGLE_BY_STATUS = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    429: "RESOURCE_EXHAUSTED",
}
#: an in-stream error of the API, as Bedrock's exception message names it
_STREAM_EXCEPTIONS = {
    "overloaded_error": "serviceUnavailableException",
    "rate_limit_error": "throttlingException",
    "api_error": "internalServerException",
    "timeout_error": "modelTimeoutException",
}


def recognise(method: str, path: str, headers: dict[str, str]) -> Dialect | None:
    """The dialect of a request, or None (not a path any provider serves)."""
    path = path.split("?")[0]
    if method != "POST":
        return None
    if path == "/v1/messages":
        signed = headers.get("authorization", "").startswith("AWS4-HMAC-SHA256 ")
        return Dialect("aws" if signed else "anthropic")
    if path == "/token":
        return Dialect("oauth")
    if path == "/anthropic/v1/messages":  # Bedrock's mantle (SigV4 or a key) or Foundry
        aws = headers.get("authorization", "").startswith(("AWS4-HMAC-SHA256 ", "Bearer ABSK"))
        return Dialect("bedrock-mantle" if aws or "x-amz-date" in headers else "foundry")
    match = _BEDROCK.match(path)
    if match is not None:
        model = urllib.parse.unquote(match.group(1))
        return Dialect("bedrock", model, match.group(2) == "invoke-with-response-stream")
    match = _VERTEX.match(path)
    if match is not None:
        return Dialect("vertex", match.group(3), match.group(4) == "streamRawPredict")
    if _GOOGLE_CLOUD.match(path):
        return Dialect("google-cloud")
    return None


def _bedrock_model(model: str) -> str:
    match = _BEDROCK_ID.match(model.rsplit("/", 1)[-1] if model.startswith("arn:") else model)
    return match.group(1) if match else model


def _request_id() -> str:
    return secrets.token_hex(16)


def oauth_token() -> dict[str, object]:
    """The OAuth token endpoint's answer (google-auth trading a signed JWT for a token)."""
    return {"access_token": GOOGLE_TOKEN, "expires_in": 3600, "token_type": "Bearer"}


# -- the AWS event stream ---------------------------------------------------------------------


def _header(name: str, value: str) -> bytes:
    raw_name, raw_value = name.encode(), value.encode()
    return (
        bytes([len(raw_name)]) + raw_name + b"\x07" + struct.pack(">H", len(raw_value)) + raw_value
    )


def frame(headers: dict[str, str], payload: bytes, *, corrupt: bool = False) -> bytes:
    """One event-stream message: prelude (lengths and their CRC), headers, payload, CRC."""
    raw_headers = b"".join(_header(name, value) for name, value in headers.items())
    total = 16 + len(raw_headers) + len(payload)
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", zlib.crc32(prelude))
    message = prelude + raw_headers + payload
    crc = zlib.crc32(message) ^ (0xFFFF if corrupt else 0)
    return message + struct.pack(">I", crc)


def event_frame(event: dict[str, Any], data: bytes, *, corrupt: bool = False) -> bytes:
    """A ``chunk`` event holding one Messages API event (``data``, its JSON), base64, with
    the padding field Bedrock adds so sizes do not give tokens away."""
    if event.get("type") == "message_stop":  # Bedrock adds its own metrics to the last event
        metrics = {"inputTokenCount": 0, "outputTokenCount": 0, "invocationLatency": 1}
        data = data[:-1] + b',"amazon-bedrock-invocationMetrics":' + json.dumps(metrics).encode()
        data += b"}"
    padding = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[
        : secrets.randbelow(40) + 1
    ]
    payload = json.dumps({"bytes": base64.b64encode(data).decode(), "p": padding}).encode()
    headers = {
        ":event-type": "chunk",
        ":content-type": "application/json",
        ":message-type": "event",
    }
    return frame(headers, payload, corrupt=corrupt)


def exception_frame(error_type: str, message: str) -> bytes:
    """An ``exception`` message: what Bedrock sends when a stream fails part way."""
    name = error_type if error_type.endswith("Exception") else None
    name = name or _STREAM_EXCEPTIONS.get(error_type, "modelStreamErrorException")
    name = name[:1].lower() + name[1:]  # the wire's spelling: throttlingException
    headers = {
        ":exception-type": name,
        ":content-type": "application/json",
        ":message-type": "exception",
    }
    return frame(headers, json.dumps({"message": message}).encode())
