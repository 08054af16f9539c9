# Gunicorn for a Flask app with quart-claude:  gunicorn -c deploy/gunicorn.conf.py myapp:app
# (any CLI flag overrides its setting here, e.g. -b 0.0.0.0:9000).
from quart_claude.flask import post_worker_init  # noqa: F401  (a SIGTERM drains open streams)

bind = ["0.0.0.0:8000"]

# gthread: each open stream holds one thread for as long as it streams; the worker's own
# heartbeat runs in its main thread, so --timeout never cuts a long answer. (The sync worker
# would: one stream blocks the whole worker, and an answer longer than --timeout is killed.)
worker_class = "gthread"
workers = 2
threads = 64  # concurrent streams per worker, plus a few for /ready and resumes
# gthread also caps open connections per worker (default 1000); above ~500 streams per worker
# raise the open-file limit too (`ulimit -n`, LimitNOFILE=): each stream holds two
# descriptors, the client's and the upstream's, and the usual soft limit is 1024.
worker_connections = 1000

# Seconds a SIGTERM'd worker gets to finish its requests: above CLAUDE_SHUTDOWN_GRACE (5 s),
# the time the extension gives open streams to send their retryable `shutdown` event.
graceful_timeout = 10
timeout = 30
# Idle keep-alive between requests: above nginx's upstream keepalive_timeout (60 s), so the
# proxy always closes an idle connection first and never reuses one Gunicorn just closed.
keepalive = 75

accesslog = "-"
errorlog = "-"

# Gunicorn >= 27's management socket: off, or several Gunicorns on one host share its default
# path (older releases ignore the setting).
control_socket_disable = True
