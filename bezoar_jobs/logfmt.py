"""``bezoar --log-format json``: one JSON object per log event, for ``kubectl logs`` and log stacks.

Each line carries ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``msg``, the stage when the process
runs one (``BEZOAR_STAGE``), and the event's own fields: a request flow's progress events (``event:
progress`` / ``flow_done`` with asked, done, in flight, retries, failed, req/s, tok/s, see
:mod:`bezoar_jobs.llm.flow`) put their figures there. The option is passed on to the stage processes
of ``bezoar run`` through ``BEZOAR_LOG_FORMAT``. Every line goes through :func:`redact.redact`, as the
text format does.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os

from . import redact

LOG_FORMAT_ENV = "BEZOAR_LOG_FORMAT"
STAGE_ENV = "BEZOAR_STAGE"
# attributes every LogRecord has: the rest are the event's own fields (``extra=``)
_STANDARD = frozenset(vars(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        stage = os.environ.get(STAGE_ENV)
        if stage:
            out["stage"] = stage
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return redact.redact(json.dumps(out, default=str, ensure_ascii=False))


def install(handlers: list[logging.Handler] | None = None) -> None:
    for h in handlers if handlers is not None else logging.getLogger().handlers:
        h.setFormatter(JsonFormatter())
