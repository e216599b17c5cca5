"""gunicorn settings for the example: 2 pre-forked workers of 2 threads.

The port comes from FLASK_SERVICE_PORT (default 8000); `gunicorn -b` on the
command line overrides it.
"""

import os

bind = f"127.0.0.1:{os.environ.get('FLASK_SERVICE_PORT', '8000')}"
workers = 2
threads = 2
worker_class = "gthread"
# Workers are forked from the master after the app is imported in each of
# them (no preload): each worker's leak is its own.
preload_app = False
# Keep-alive off: each request is one connection, so the kernel's accept
# queue spreads them over both workers.
keepalive = 0
accesslog = None
errorlog = "-"
loglevel = "warning"
