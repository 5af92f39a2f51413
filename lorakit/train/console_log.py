"""The console log of a run. sd-scripts' console logging options (library/utils.py add_logging_arguments /
setup_logging): ``console_log_level`` (DEBUG .. CRITICAL; INFO when only the others are given),
``console_log_file`` (the log goes to this file, rewritten, instead of the console), ``console_log_simple``
(messages only; sd-scripts' plain handler instead of rich's). Without any of them, `lorakit train` shows INFO
messages alone (sd-scripts' default level; its run summary is printed without time or level), while a program that
calls ``train()`` keeps Python's logging as it is (warnings to stderr).

The handler sits on the ``lorakit`` logger, not the root one, and is removed when the run ends, so a program that
calls ``train()`` keeps its own logging. On the console, lines are written around the progress bar (tqdm.write)
rather than through it."""

from __future__ import annotations

import contextlib
import logging
import sys

__all__ = ["console_logging", "default_console_logging"]

_FULL = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_SIMPLE = "%(message)s"


def _options_given(config) -> bool:
    return config.console_log_level is not None or bool(config.console_log_file) or bool(config.console_log_simple)


@contextlib.contextmanager
def console_logging(config):
    """The console options of ``config`` for the time of a run (nothing when none is given)."""
    if not _options_given(config):
        yield
        return
    if config.console_log_file:
        handler = logging.FileHandler(config.console_log_file, mode="w", encoding="utf-8")
    else:
        handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_SIMPLE if config.console_log_simple else _FULL, "%Y-%m-%d %H:%M:%S"))
    with _installed(handler, getattr(logging, config.console_log_level or "INFO")):
        yield


@contextlib.contextmanager
def default_console_logging(config):
    """lorakit's commands without console options: INFO messages, text only (what sd-scripts shows by default)."""
    if _options_given(config):
        yield
        return
    handler = _BarAwareHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(_SIMPLE))
    with _installed(handler, logging.INFO):
        yield


@contextlib.contextmanager
def _installed(handler: logging.Handler, level: int):
    logger = logging.getLogger("lorakit")
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


class _BarAwareHandler(logging.StreamHandler):
    """A console handler that writes through tqdm.write, so that a line logged during training does not split the
    progress bar (as print would)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            super().emit(record)
            return
        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's rule: a failed log line never stops the program
            self.handleError(record)
