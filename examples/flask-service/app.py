"""A Flask backend with the memory habits of real leaky services.

Each endpoint answers JSON that names the worker that served it (``pid``),
so a client can tell how many requests each gunicorn worker handled.

- ``/analyze``: keeps one 64 KiB payload per request in a module-level list
  and never drops it (the leak).
- ``/lookup?key=K``: an unbounded dict used as a cache; grows with every
  distinct key.
- ``/report?key=K``: a ``functools.lru_cache``-bounded cache; stops growing
  after ``REPORT_CACHE_SIZE`` distinct keys.
- ``/churn``: allocates and frees (temporary memory, nothing kept).
- ``/health``: liveness.
"""

import functools
import os

from flask import Flask, jsonify, request

app = Flask(__name__)

# Size of one /analyze payload. bytearray(n) asks malloc for n + 1 bytes
# (its buffer ends with a NUL) because CPython's allocator hands any request
# above 512 bytes to malloc unchanged.
PAYLOAD_BYTES = 64 * 1024
# Bytes one /lookup entry's value holds.
LOOKUP_BYTES = 4 * 1024
# Distinct /report results kept at most.
REPORT_CACHE_SIZE = 32
REPORT_BYTES = 16 * 1024
CHURN_BYTES = 256 * 1024

# The leak: one payload per /analyze request, for the life of the worker.
_analyzed = []
# The unbounded cache: one entry per distinct /lookup key, never evicted.
_lookup_cache = {}


def analyze(payload_bytes):
    payload = bytearray(payload_bytes)  # memscope: the leak's allocation line
    _analyzed.append(payload)
    return len(_analyzed)


@app.get("/analyze")
def analyze_endpoint():
    kept = analyze(PAYLOAD_BYTES)
    return jsonify(pid=os.getpid(), kept=kept)


def lookup(key):
    value = _lookup_cache.get(key)
    if value is None:
        value = _lookup_cache[key] = bytearray(LOOKUP_BYTES)
    return value


@app.get("/lookup")
def lookup_endpoint():
    key = request.args.get("key", "")
    lookup(key)
    return jsonify(pid=os.getpid(), entries=len(_lookup_cache))


@functools.lru_cache(maxsize=REPORT_CACHE_SIZE)
def build_report(key):
    return bytearray(REPORT_BYTES)


@app.get("/report")
def report_endpoint():
    key = request.args.get("key", "")
    build_report(key)
    return jsonify(pid=os.getpid(), entries=build_report.cache_info().currsize)


def churn():
    scratch = bytearray(CHURN_BYTES)
    return sum(scratch[::4096])


@app.get("/churn")
def churn_endpoint():
    return jsonify(pid=os.getpid(), checksum=churn())


@app.get("/health")
def health():
    return jsonify(pid=os.getpid(), ok=True)
