"""Logging settings shared by the project's client processes."""

from __future__ import annotations

import logging


def quiet_http_client_logs() -> None:
    """The openai client's HTTP library (installed as `httpx` or `httpx2`) logs every request at
    INFO. A Ray driver's logging prints INFO from every library, so a bench, a batch job or a test
    would get a line per request, burying its progress lines and failure reports."""
    for name in ("httpx", "httpx2"):
        logging.getLogger(name).setLevel(logging.WARNING)
