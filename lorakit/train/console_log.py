"""sd-scripts' console logging options (library/utils.py add_logging_arguments / setup_logging) for the time of a
run: ``console_log_level`` (DEBUG .. CRITICAL; INFO when only the others are given), ``console_log_file`` (the log
goes to this file, rewritten, instead of the console), ``console_log_simple`` (messages only; sd-scripts' plain
handler instead of rich's). Without any of them lorakit leaves Python's logging as it is (warnings to stderr).

The handler sits on the ``lorakit`` logger, not the root one, and is removed when the run ends, so a program that
calls ``train()`` keeps its own logging."""

from __future__ import annotations

import contextlib
import logging
import sys

__all__ = ["console_logging"]

_FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIMPLE = "%(message)s"


@contextlib.contextmanager
def console_logging(config):
    if config.console_log_level is None and not config.console_log_file and not config.console_log_simple:
        yield
        return
    if config.console_log_file:
        handler = logging.FileHandler(config.console_log_file, mode="w", encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_SIMPLE if config.console_log_simple else _FULL, "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("lorakit")
    level = getattr(logging, config.console_log_level or "INFO")
    old_level = logger.level
    handler.setLevel(level)
    logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
        handler.close()
