"""One structured access-log line per RPC.

The call layer (`call_layer`) binds a fresh `RequestTrace` around each unary call of
clipserve's services, so the core and the batchers can fill it in, and when the call ends hands
a `CallRecord` to `AccessLog.finish`, which logs::

    /clipserve.v1.ClipService/EncodeImage OK items=4 latency_ms=12.41 queue_ms=1.93

with the same fields as a dict in the record's ``rpc`` attribute, which `JsonFormatter` writes
as JSON (``--log-format json``), and hands the record to observers (the metrics). The status
is the one the caller got. The HTTP API (`http_api`) reports its requests here as well, as
``POST /v1/embeddings OK ...`` with the gRPC status of the same outcome and ``http_status``.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from clipserve.server.settings import LogFormat
from clipserve.server.trace import RequestTrace

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CallRecord:
    """One finished RPC."""

    method: str  # e.g. /clipserve.v1.ClipService/EncodeImage, or POST /v1/embeddings (HTTP API)
    code: grpc.StatusCode  # for the HTTP API: the gRPC status of the same outcome
    latency_s: float
    trace: RequestTrace
    peer: str
    http_status: int | None = None  # the HTTP API's status code; None for gRPC calls

    def fields(self) -> dict[str, Any]:
        t = self.trace
        fields: dict[str, Any] = {
            "method": self.method,
            "status": self.code.name,
            "items": t.items,
            "latency_ms": round(self.latency_s * 1e3, 3),
            "queue_ms": round(t.queue_ns / 1e6, 3),
            "input_ms": round(t.input_ns / 1e6, 3),
            "compute_ms": round(t.compute_ns / 1e6, 3),
            "peer": self.peer,
        }
        if t.model is not None:
            fields["model"] = t.model
        if self.http_status is not None:
            fields["http_status"] = self.http_status
        return fields


CallObserver = Callable[[CallRecord], None]


class AccessLog:
    """Logs finished calls (unless `log_calls` is false) and hands them to `observers`."""

    def __init__(self, observers: Sequence[CallObserver] = (), *, log_calls: bool = True) -> None:
        self._observers = tuple(observers)
        self._log_calls = log_calls

    def finish(self, record: CallRecord) -> None:
        """Log a finished call and hand it to the observers (the HTTP API reports here too)."""
        if self._log_calls and log.isEnabledFor(logging.INFO):
            fields = record.fields()
            log.info(
                "%s %s items=%d latency_ms=%.2f queue_ms=%.2f",
                record.method, fields["status"], fields["items"], fields["latency_ms"],
                fields["queue_ms"], extra={"rpc": fields},
            )
        for observer in self._observers:
            try:
                observer(record)
            except Exception:  # metrics must never fail a call
                log.exception("access-log observer %r failed", observer)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, plus an access line's fields."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.datetime.fromtimestamp(record.created, tz=datetime.timezone.utc)
        data: dict[str, Any] = {
            "time": created.isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        rpc = getattr(record, "rpc", None)
        if isinstance(rpc, dict):
            data.update(rpc)
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def use_log_format(log_format: LogFormat) -> None:
    """Give the root logger's handlers `JsonFormatter` for ``json``; ``text`` leaves them."""
    if log_format is LogFormat.JSON:
        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
