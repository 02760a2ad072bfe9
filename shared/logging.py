"""structlog, configured once: JSON lines when not on a terminal, colours when on one."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(level: str | None = None, *, json: bool | None = None) -> None:
    """Route structlog and the standard library through one renderer, at `level`
    (default: `MEDHIVE_LOG_LEVEL`, else INFO).

    Context bound with `structlog.contextvars.bound_contextvars` (job id, message id,
    tenant) appears on every line logged while it is bound.
    """
    level = level or os.environ.get("MEDHIVE_LOG_LEVEL", "INFO")
    if json is None:
        json = not sys.stdout.isatty()
    shared_processors: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    if json:
        shared_processors.append(structlog.processors.format_exc_info)
    structlog.configure(
        processors=[*shared_processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    # Libraries (aio-pika, aiormq, aiohttp) log through the standard library: their
    # warnings go through the same processors and renderer, so a JSON stream stays JSON;
    # their chatter below WARNING is dropped.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *shared_processors],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)
