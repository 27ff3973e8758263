"""Operational logs (not the audit log): one JSON object per line on stderr by default — `time`, `level`,
`logger`, `message`, then the record's fields (`extra=`) — or a line for humans with `--log-format text`.

uvicorn's and the libraries' records go through the same handler. httpx and httpcore are held at WARNING
whatever `--log-level` says: their INFO lines print request URLs, and a remote validator's URL carries the
credential (`?token={value}`)."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback
from typing import Any, Literal, TextIO

import orjson

LogFormat = Literal["json", "text"]
LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")

# Attributes every LogRecord has; anything else on a record came from `extra=` and is a field of the line.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}
# Libraries whose INFO/DEBUG lines may carry URLs with credentials in their query string, or are per-request noise.
_QUIET = {"httpx": logging.WARNING, "httpcore": logging.WARNING, "hpack": logging.WARNING,
          "uvicorn.access": logging.WARNING}


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD and not key.startswith("_")}


def _time(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int(created % 1 * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {"time": _time(record.created), "level": record.levelname.lower(),
                                "logger": record.name, "message": record.getMessage()}
        line.update(fields_of(record))
        if record.exc_info:
            line["exception"] = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = f"{_time(record.created)} {record.levelname:<7} {record.name}: {record.getMessage()}"
        fields = fields_of(record)
        if fields:
            text += " " + " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if record.exc_info:
            text += "\n" + "".join(traceback.format_exception(*record.exc_info)).rstrip()
        return text


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    return text if text and " " not in text else orjson.dumps(text).decode()


def configure(log_format: str | None = None, level: str | None = None, stream: TextIO | None = None) -> None:
    """Install the one handler on the root logger. Format and level come from the arguments, else from
    `SIDECAR_LOG_FORMAT` / `SIDECAR_LOG_LEVEL` (how `sidecar run` hands them to its worker processes)."""
    log_format = (log_format or os.environ.get("SIDECAR_LOG_FORMAT") or "json").lower()
    level = (level or os.environ.get("SIDECAR_LOG_LEVEL") or "info").lower()
    if log_format not in FORMATS:
        raise ValueError(f"unknown log format {log_format!r}; use json or text")
    if level not in LEVELS:
        raise ValueError(f"unknown log level {level!r}; use one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    # uvicorn's INFO lines ("Started server process", "Waiting for application startup") repeat for each of the
    # two or three servers in every worker; the sidecar's own start-up line says all of it once.
    logging.getLogger("uvicorn.error").setLevel(logging.DEBUG if level == "debug" else logging.WARNING)
    for name, floor in _QUIET.items():
        logging.getLogger(name).setLevel(max(floor, root.level))
