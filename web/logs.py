"""Logging: one line per event, as text or JSON (``LOG_FORMAT``), with the request id."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Mapping
from contextvars import ContextVar
from datetime import UTC, datetime

from hypercorn.logging import Logger as HypercornLogger
from hypercorn.typing import ResponseSummary, WWWScope

#: The id of the request the current task serves (``-`` outside requests).
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")

# Attributes every LogRecord has; anything else came through ``extra=`` and is a field.
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "request_id"}


class RequestIdFilter(logging.Filter):
    """Stamps each record with the current request id."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


class NoEmptyTracebackFilter(logging.Filter):
    """Drops a record's ``exc_info`` when it holds no exception, so that the record stays one
    line: coredis 6.9.0 logs a dropped connection ("Connection closed unexpectedly!") with
    ``exc_info=True`` outside any ``except`` block (``coredis/connection/_base.py``), and the
    formatter would print ``NoneType: None`` on a line of its own after it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, request id and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "request_id": getattr(record, "request_id", "-"),
        }
        entry.update((key, value) for key, value in vars(record).items() if key not in _STANDARD)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


def configure_logging(level: str, fmt: str) -> None:
    """Log to stderr at ``level`` as ``text`` or ``json``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter())
    handler.addFilter(NoEmptyTracebackFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


#: The access log line: the request line without its query string (tokens may travel in
#: ``?token=``), the status, the body's length and the time taken.
ACCESS_LOG_FORMAT = '%(h)s "%(r)s" %(s)s %(b)s %(D)sus'


class _Atoms(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return "-"


class AccessLogger(HypercornLogger):
    """Hypercorn's logger, with only the access-log atoms ``ACCESS_LOG_FORMAT`` prints.

    Hypercorn's own atoms hold every request and response header and every environment
    variable, built for every request; these are the same values for the keys printed.
    """

    def atoms(
        self, request: WWWScope, response: ResponseSummary | None, request_time: float
    ) -> Mapping[str, str]:
        client = request.get("client")
        method = request["method"] if request["type"] == "http" else "GET"
        atoms = _Atoms(
            h="None" if client is None else f"{client[0]}:{client[1]}",
            r=f"{method} {request['path']} {request.get('http_version', 'ws')}",
            s="-",
            D=str(int(request_time * 1_000_000)),
        )
        if response is not None:
            atoms["s"] = str(response["status"])
            for name, value in response.get("headers", ()):
                if name.lower() == b"content-length":
                    atoms["b"] = value.decode("latin1")
        return atoms
