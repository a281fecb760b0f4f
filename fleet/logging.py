"""structlog set-up, done once per process.

Services log JSON lines (one event a line, machine-readable); the CLI logs for humans.
Context such as `device`, `session` and `request` is bound with structlog's contextvars,
which new threads (paho's network thread included) do not inherit: bind per message with
`structlog.contextvars.bound_contextvars`.
"""

import logging
import sys
from typing import Literal

import structlog

LogFormat = Literal["console", "json"]

_configured = False


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time of the write: test runners and CLIs
    swap and close the stream, and threads that outlive them must not write to a dead one."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: LogFormat = "console") -> None:
    """Route structlog (and stdlib logging) to stderr in the chosen format; idempotent."""
    global _configured
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    renderer = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_CurrentStderr()),
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=sys.stderr, force=True)
    _configured = True


def get_logger(**bound: object) -> structlog.stdlib.BoundLogger:
    """A logger with `bound` context; configures console logging on first use if nobody did."""
    if not _configured:
        configure_logging()
    return structlog.get_logger("fleet").bind(**bound)
