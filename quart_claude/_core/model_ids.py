"""Model ids as each provider spells them, read as the first-party id they contain (no SDK
here: the price table and the continuation rules read it)."""

from __future__ import annotations

import re

__all__ = ["canonical_model"]

# Bedrock: [global.|us.|eu.|...]anthropic.claude-sonnet-4-5-20250929-v1:0; Vertex:
# claude-sonnet-4-5@20250929. The first-party id is what prices and model rules are keyed by.
_BEDROCK_ID = re.compile(r"^(?:[a-z]{2,6}\.)?anthropic\.(claude-[a-z0-9.-]+?)(?:-v\d+(?::\d+)?)?$")


def canonical_model(model: str) -> str:
    """The first-party id of a provider's model id (an inference-profile ARN is kept as is)."""
    if model.startswith("claude-"):
        return model.replace("@", "-") if "@" in model else model
    match = _BEDROCK_ID.match(model.rsplit("/", 1)[-1] if model.startswith("arn:") else model)
    return match.group(1) if match else model
