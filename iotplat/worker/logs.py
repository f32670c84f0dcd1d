"""Structured logs: one JSON object per line on stderr. Never pass a secret to these functions."""

from __future__ import annotations

import json
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Any, TextIO

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}


class Log:
    def __init__(self, stream: TextIO | None = None, level: str = "info", **context: Any) -> None:
        self.stream = stream or sys.stderr
        self.min = LEVELS[level]
        self.context = context
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: str, event: str, **fields: Any) -> None:
        if LEVELS[level] < self.min:
            return
        rec = {"ts": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
               "level": level, "event": event}
        rec.update(self.context)
        rec.update(fields)
        line = json.dumps(rec, default=str, ensure_ascii=True, separators=(",", ":"))
        with self._lock:
            try:
                self.stream.write(line + "\n")
                self.stream.flush()
            except (OSError, ValueError):
                pass

    def debug(self, event: str, **f: Any) -> None:
        self.log("debug", event, **f)

    def info(self, event: str, **f: Any) -> None:
        self.log("info", event, **f)

    def warning(self, event: str, **f: Any) -> None:
        self.log("warning", event, **f)

    def error(self, event: str, **f: Any) -> None:
        self.log("error", event, **f)

    def every(self, key: str, seconds: float, level: str, event: str, **f: Any) -> None:
        """Log at most once per ``seconds`` for ``key``; the next line says how many were skipped."""
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < seconds:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return
            self._last[key] = now
            skipped = self._suppressed.pop(key, 0)
        if skipped:
            f["suppressed_since_last"] = skipped
        self.log(level, event, **f)
