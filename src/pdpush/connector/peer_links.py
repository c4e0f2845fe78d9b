"""P's connections to D ranks: made off the forward path, checked, failures cached with back-off.

Connecting means fetching D's `/meta` from the side channel named in the (signed) push target,
checking that it is the D that signed it (engine id and per-start instance id) and that P may
write into it (connector/compat.py), and adding D's NIXL agent. It runs on a small thread pool:
the worker's step only looks the link up (`lookup`), so a slow or dead D never stalls P's
forward. A failed link is remembered and retried only after a back-off that doubles per failure.
"""

from __future__ import annotations

import base64
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from pdpush.connector.compat import describe, mismatch, wrong_d
from pdpush.connector.kv_region import RemoteKV
from pdpush.connector.metadata import PushTarget
from pdpush.rpc.json_server import get_json
from pdpush.transfer.engine import TransferEngine, TransferError

log = logging.getLogger("vllm.pdpush.prefill")
BACKOFF_S = (1.0, 30.0)  # first retry after a failure, longest wait between retries


def backoff_s(failures: int) -> float:
    """How long to leave a D alone after its `failures`-th failure in a row."""
    return min(BACKOFF_S[1], BACKOFF_S[0] * 2 ** (failures - 1))


@dataclass
class Link:
    """One D rank as P knows it. `peer` is set once connected; `error` when P must not write
    (then `peer` may still be set, so that D can be told at once, e.g. on a model mismatch)."""

    peer: RemoteKV | None = None
    error: str = ""
    pending: bool = True
    failures: int = 0
    retry_at: float = 0.0


class PeerLinks:
    def __init__(self, engine: TransferEngine, rank: int, identity: dict[str, Any],
                 authenticated: bool, timeout_s: float) -> None:
        self.engine = engine
        self.rank = rank
        self.identity = describe(identity, authenticated)
        self.timeout_s = timeout_s
        self._links: dict[tuple[str, str, str], Link] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"pdpush-connect-{rank}")

    def lookup(self, target: PushTarget) -> Link:
        """The link for the target's D; starts connecting (again, after back-off) if needed."""
        key = (target.side_channel, target.d_engine_id, target.d_instance_id)
        with self._lock:
            link = self._links.get(key)
            if link is None or (link.error and link.peer is None and time.monotonic() >= link.retry_at):
                failures = link.failures if link else 0
                link = self._links[key] = Link(failures=failures)
                self._pool.submit(self._connect, key, link)
            return link

    def _connect(self, key: tuple[str, str, str], link: Link) -> None:
        side_channel, engine_id, instance_id = key
        host, _, port = side_channel.rpartition(":")
        url = f"http://{host}:{int(port) + self.rank}/meta"
        peer, error = None, ""
        try:
            desc = get_json(url, self.timeout_s)
            error = wrong_d(desc, engine_id, instance_id, url)
            if not error:
                error = mismatch(self.identity, desc.get("identity") or {})
                error = error and f"P cannot write into D at {url}: {error}"
                agent = self.engine.add_peer(base64.b64decode(desc["metadata"]))
                self.engine.connect(agent)
                peer = RemoteKV.from_description(agent, desc)
        except (OSError, ValueError, KeyError, TypeError, AttributeError, TransferError) as exc:
            error = f"cannot reach D's side channel {url}: {exc}"
        with self._lock:
            link.peer, link.error, link.pending = peer, error, False
            if error:
                link.failures += 1
                link.retry_at = time.monotonic() + backoff_s(link.failures)
                log.warning("pdpush: %s", error)
            else:
                link.failures = 0

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
