"""Log set-up (plain text, or one JSON object per line with LOG_FORMAT=json) and the request line.

The per-request line is logged by `embedding_api.access` with an `AccessLine` as its message: it is
rendered only if a handler formats it (plain: `key=value` pairs; JSON: the fields at the top level).
"""

from __future__ import annotations

import logging
import sys
import time

import orjson

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
access_log = logging.getLogger("embedding_api.access")


class AccessLine:
    """The fields of one request's log line; str() is the plain form."""

    __slots__ = ("fields",)

    def __init__(self, fields: dict):
        self.fields = fields

    def __str__(self) -> str:
        f = self.fields
        line = f"{f['method']} {f['route']} {f['status']} request_id={f['request_id']} code={f['code'] or '-'}"
        if "path" in f:  # a path no route serves: what was asked for
            line += f" path={f['path']}"
        inputs = f.get("inputs")
        if inputs is not None:
            kinds = ",".join(f"{k}:{v}" for k, v in inputs.items()) or "-"
            line += f" inputs={kinds} prompt_tokens={f['prompt_tokens']}"
            if "queue_ms" in f:
                line += (f" truncated_inputs={f['truncated_inputs']} prepare_ms={f['prepare_ms']:.2f}"
                         f" queue_ms={f['queue_ms']:.2f} forward_ms={f['forward_ms']:.2f}")
        return f"{line} total_ms={f['total_ms']:.2f} client={f['client'] or '-'}"


def log_request(level: int, fields: dict) -> None:
    """The request line, without the caller lookup that Logger.log does (nothing to find here)."""
    access_log.handle(access_log.makeRecord(access_log.name, level, "(request)", 0, AccessLine(fields), (), None))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then a request's fields."""

    def format(self, record: logging.LogRecord) -> str:
        body = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
        }
        if isinstance(record.msg, AccessLine):
            body["message"] = "request"
            for key, value in record.msg.fields.items():
                body[key] = round(value, 2) if key.endswith("_ms") else value
        else:
            body["message"] = record.getMessage()
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(body, default=str).decode()


_OURS = "_embedding_api_handler"


def configure_logging(level: str, fmt: str = "plain") -> None:
    """Like logging.basicConfig (a stderr handler on the root logger unless it has one already),
    with the chosen format; JSON also reformats uvicorn's own lines. Safe to call again."""
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else logging.Formatter(PLAIN_FORMAT)
    root = logging.getLogger()
    ours = [h for h in root.handlers if getattr(h, _OURS, False)]
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        setattr(handler, _OURS, True)
        root.addHandler(handler)
        root.setLevel(level.upper())
        ours = [handler]
    for handler in ours:
        handler.setFormatter(formatter)
    if fmt == "json":
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            for handler in logging.getLogger(name).handlers:
                handler.setFormatter(formatter)
    logging.getLogger("embedding_api").setLevel(level.upper())
