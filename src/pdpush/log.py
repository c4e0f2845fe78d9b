"""Logging set-up shared by every pdpush command: one format, and quiet libraries by default.

A person running `pdpush demo` should see pdpush's few progress lines and the result, not one
`httpx: HTTP Request: GET …` line per health or metrics poll. So the root logger (every library:
httpx, httpcore, urllib3, asyncio, matplotlib, …) stays at WARNING and only pdpush's own logger
says INFO; -v lets library INFO through and pdpush's DEBUG, -vv everything, -q only warnings.
PDPUSH_LOG (e.g. DEBUG) sets pdpush's level when no flag is given. The vLLM servers a command
starts are other processes and write their own logs to files (pdpush.local.cluster).
"""

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def levels(verbosity: int) -> tuple[int, int]:
    """(root level, pdpush level) for verbosity -1 (quiet), 0 (default), 1 (-v), 2+ (-vv)."""
    if verbosity < 0:
        return logging.WARNING, logging.WARNING
    if verbosity == 0:
        own = logging.getLevelName(os.environ.get("PDPUSH_LOG", "INFO").upper())
        return logging.WARNING, own if isinstance(own, int) else logging.INFO
    return (logging.INFO if verbosity == 1 else logging.DEBUG), logging.DEBUG


def setup_logging(verbosity: int = 0) -> None:
    """Give the root logger a handler (once) and set both levels (every time: a second call wins)."""
    root, own = levels(verbosity)
    logging.basicConfig(format=FORMAT)
    logging.getLogger().setLevel(root)
    logging.getLogger("pdpush").setLevel(own)
