"""The model ids the tests depend on, in one place.

The SDK warns (``DeprecationWarning``) on ids it lists as deprecated, and the suite runs with
warnings as errors, so when a release deprecates one of these, the change is one line here
(``test_models_in_use_are_current`` says which).
"""

from quart_claude import DEFAULT_MODEL

#: Accepts an assistant prefill (a pre-4.6 model), so continuations use one.
PREFILL_MODEL = "claude-haiku-4-5"
#: Refuses a prefill with a 400 (4.6 and later), so continuations use the "continue" turn.
NO_PREFILL_MODEL = "claude-sonnet-4-6"
#: One the SDK warns about at request time: the relay must not fail a stream for it.
DEPRECATED_MODEL = "claude-mythos-preview"  # deprecated in every SDK we test: 2.10, 2.14, 2.15

#: Every id above that must not warn.
CURRENT_MODELS = (DEFAULT_MODEL, PREFILL_MODEL, NO_PREFILL_MODEL)
