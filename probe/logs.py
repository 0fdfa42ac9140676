"""Structured JSON log lines: one at startup, one per readiness/liveness state change, never one per probe."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from probe.verdict import Verdict

LOGGER = "probe"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(level: str = "info") -> logging.Logger:
    logger = logging.getLogger(LOGGER)
    logger.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(logger: logging.Logger, level: int, msg: str, **fields: Any) -> None:
    logger.log(level, msg, extra={"fields": fields})


class StateLogger:
    """Logs when the aggregate readiness (or liveness) flips, with the failing checks and their reasons."""

    def __init__(self, logger: logging.Logger, kind: str) -> None:
        self._logger = logger
        self._kind = kind
        self._state: bool | None = None
        self._failing: dict[str, str] = {}

    def observe(self, verdict: Verdict) -> None:
        failing = {n: r.reason for n, r in verdict.checks.items() if not r.ok}
        ok = verdict.ok
        if ok == self._state and set(failing) == set(self._failing):
            return
        previous = self._state
        self._state, self._failing = ok, failing
        if ok:
            log(self._logger, logging.INFO, f"{self._kind}: passing", state="pass", previous=previous)
        else:
            log(self._logger, logging.WARNING, f"{self._kind}: failing", state="fail", failing=failing)
