"""The core: everything that knows no web framework (configuration, validation, the relay,
retries and recovery, streams and their stores, telemetry, the routes as plain functions).
The front ends, ``quart_claude._quart`` (Quart) and ``quart_claude.flask`` (Flask), only
translate requests and responses."""
