"""`--usage-log FILE`: every request's UsageRecord as one JSON line, appended and flushed per
row, like an access log (read it with `jq`, or back into rows with `read_usage_log`)."""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
from pathlib import Path

from ladle.errors import LadleError
from ladle.metering.usage import UsageRecord

log = logging.getLogger(__name__)


class UsageLog:
    """A UsageSink writing JSON lines to a file (appended: a restart keeps the earlier rows)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        except OSError as e:
            raise LadleError(f"--usage-log {path}: cannot open it for writing: {e.strerror or e}") from None
        self._lock = threading.Lock()

    def record(self, row: UsageRecord) -> None:
        line = json.dumps(dataclasses.asdict(row), separators=(",", ":"), ensure_ascii=False)
        try:
            with self._lock:
                self._file.write(line + "\n")
                self._file.flush()
        except (OSError, ValueError) as e:  # a full disk, a closed file: logged, the request goes on
            log.warning("usage log %s: cannot write a row: %s", self.path, e)

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_usage_log(path: str | Path) -> list[UsageRecord]:
    """The rows a usage log holds, in the order written."""
    lines = Path(path).expanduser().read_text(encoding="utf-8").splitlines()
    return [UsageRecord(**json.loads(line)) for line in lines if line.strip()]
