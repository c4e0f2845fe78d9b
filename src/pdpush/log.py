"""Logging set-up shared by every pdpush command: one format, level from -v/-q or PDPUSH_LOG."""

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(verbosity: int = 0) -> None:
    """Configure the root logger once; verbosity -1 quiet, 0 info, 1+ debug."""
    default = os.environ.get("PDPUSH_LOG", "INFO").upper()
    level = {-1: logging.WARNING, 0: getattr(logging, default, logging.INFO)}.get(
        verbosity, logging.DEBUG
    )
    logging.basicConfig(level=level, format=FORMAT)
