"""D's scheduler half: decide local vs remote, send do_prefill, hold blocks under a lease.

Life of a remote prefill on D (request R):
1. `get_num_new_matched_tokens`: the policy picks a P; vLLM is told the uncached tokens will
   arrive asynchronously, so it allocates R's blocks and parks R in WAITING_FOR_REMOTE_KVS.
2. `update_state_after_alloc`: D's block ids are known; the do_prefill call is queued on the rpc
   thread (the scheduler never waits) and the workers are told to expect R's notification.
3. Workers report R in finished_recving once P's completion notification arrived (then R joins
   decode) or in failed_recving (then vLLM recomputes R locally, or fails it: on_failure).
4. If P errs, is unreachable, or the lease runs out (deadline + grace), the workers are told to
   give R up. Blocks are reused only after P confirmed or the lease ended: P posts no WRITE past
   the deadline, so nothing lands in a block D handed to someone else.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pdpush.connector.config import PdpushConfig
from pdpush.connector.metadata import (
    DecodeStepMeta, ParamsError, PushTarget, client_mode,
)
from pdpush.policy import Policy, PolicyConfig
from pdpush.rpc.prefill_client import HealthReport, PrefillClient, PrefillJob, PrefillResult

if TYPE_CHECKING:
    from vllm.v1.request import Request

log = logging.getLogger("vllm.pdpush.decode")  # under vllm: shown in its log


@dataclass
class RemotePrefill:
    """One request whose KV is on its way from a P."""

    url: str
    lease_end: float
    give_up: bool = False  # told the workers to stop waiting
    aborted: bool = False  # the client went away while waiting


@dataclass
class DecodeCounters:
    local: int = 0
    remote: int = 0
    remote_ok: int = 0
    fallback: int = 0  # remote prefill failed, request recomputed on D (or failed)
    aborted_waiting: int = 0
    first_token_checked: int = 0
    first_token_mismatch: int = 0  # greedy: P's token differs from D's = suspected corruption


@dataclass
class DecodeScheduler:
    config: PdpushConfig
    block_size: int
    engine_id: str
    probe_enabled: bool = False
    policy: Policy = field(init=False)
    client: Any = None  # PrefillClient; tests pass a stand-in
    counters: DecodeCounters = field(default_factory=DecodeCounters)
    _chosen: dict[str, str] = field(default_factory=dict)  # between match and alloc
    _remote: dict[str, RemotePrefill] = field(default_factory=dict)
    _local_only: set[str] = field(default_factory=set)  # failed remotes, recomputed here
    _where: dict[str, dict[str, Any]] = field(default_factory=dict)  # for the response
    _expect: list[str] = field(default_factory=list)
    _awaiting_p_token: dict[str, int] = field(default_factory=dict)  # D's first token, by request

    def __post_init__(self) -> None:
        cfg = self.config
        self.policy = Policy.for_urls(
            PolicyConfig(cfg.remote_threshold_tokens, cfg.max_inflight_per_prefill,
                         cfg.max_prefill_queue, cfg.retry_after_s),
            cfg.prefill_urls,
        )
        if self.client is None:
            self.client = PrefillClient(cfg.prefill_urls, cfg.health_interval_s)

    # -- vLLM hooks ------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request", num_computed: int) -> tuple[int, bool]:
        req_id = request.request_id
        if req_id in self._remote or req_id in self._local_only:
            return 0, False
        self._collect_rpc(time.time())  # an idle D builds no steps: fresh health before deciding
        try:
            mode, _ = client_mode(request.kv_transfer_params)
        except ParamsError as exc:
            self._where[req_id] = {"prefill": "local", "pdpush_error": str(exc)}
            return 0, False
        uncached = request.num_prompt_tokens - num_computed
        if mode == "local":
            decision_url, reason = None, "client_asked_local"
        elif request.num_tokens > request.num_prompt_tokens:  # preempted and resumed: has output
            decision_url, reason = None, "resumed"
        else:
            decision = self.policy.choose(uncached, time.time(), force_remote=mode == "remote")
            decision_url, reason = decision.url, decision.reason
        if decision_url is None:
            self._chosen.pop(req_id, None)
            self._where[req_id] = {"prefill": "local", "reason": reason}
            return 0, False
        self._chosen[req_id] = decision_url
        return uncached, True

    def update_state_after_alloc(self, request: "Request", blocks: Any, num_external: int) -> None:
        req_id = request.request_id
        url = self._chosen.pop(req_id, None)
        if num_external == 0 or url is None:
            return
        block_ids = list(blocks.get_block_ids()[0])
        skip = request.num_prompt_tokens - num_external
        deadline = time.time() + self.config.prefill_timeout_s
        target = PushTarget(req_id, self.engine_id,
                            f"{self.config.side_channel_host}:{self.config.side_channel_port}",
                            tuple(block_ids), skip, self.block_size, deadline)
        sp = request.sampling_params
        greedy = sp is not None and sp.temperature < 1e-5
        _, tokens = client_mode(request.kv_transfer_params)  # validated in the match step
        self.client.submit(PrefillJob(
            req_id, url, tokens or list(request.prompt_token_ids), _sampling_for_p(sp),
            target.to_params(), deadline,
        ))
        self.policy.started(url)
        self._remote[req_id] = RemotePrefill(url, deadline + self.config.lease_grace_s)
        self._where[req_id] = {"prefill": "remote", "url": url, "skip_tokens": skip,
                               "greedy": greedy}
        self._expect.append(req_id)
        self.counters.remote += 1

    def build_meta(self, scheduler_output: Any) -> DecodeStepMeta:
        now = time.time()
        self._collect_rpc(now)
        give_up = []
        for req_id, rec in self._remote.items():
            if not rec.give_up and now > rec.lease_end:
                log.warning("pdpush: %s: no KV from %s before the lease ended", req_id, rec.url)
                rec.give_up = True
            if rec.give_up:
                give_up.append(req_id)
        meta = DecodeStepMeta(expect=self._expect, give_up=give_up)
        if self.probe_enabled:
            from pdpush.probe import batch_stats_from

            meta.batch_stats = batch_stats_from(scheduler_output)
        self._expect = []
        return meta

    def update_connector_output(self, finished_recving: set[str], failed: set[str]) -> None:
        for req_id in finished_recving:
            rec = self._remote.pop(req_id, None)
            if rec is None:
                continue
            if rec.aborted:
                self._where.pop(req_id, None)
            elif req_id in failed:
                self.counters.fallback += 1
                self._local_only.add(req_id)
                self._where[req_id] = {**self._where.get(req_id, {}), "prefill": "fallback"}
            else:
                self.counters.remote_ok += 1

    def request_finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._collect_rpc(time.time())
        self._chosen.pop(req_id, None)
        self._local_only.discard(req_id)
        rec = self._remote.get(req_id)
        if rec is not None:  # still waiting for KV: hold the blocks until P confirms or lease ends
            rec.aborted = True
            self.counters.aborted_waiting += 1
            if self.client.cancel(req_id):
                log.info("pdpush: %s aborted while waiting for KV; cancelled do_prefill", req_id)
            return True, None
        where = self._where.pop(req_id, None)
        if where is None:
            return False, None
        self.counters.local += where["prefill"] == "local"
        self._check_first_token(req_id, where, request.output_token_ids)
        return False, {"pdpush": where}

    def stats(self) -> dict[str, Any]:
        """Counters, the policy's inputs per P, and what is waiting (for /stats and tests)."""
        now = time.time()
        peers = {p.url: {"inflight": p.inflight, "queue": p.queue, "healthy": p.available(now),
                         "completed": p.completed, "failed": p.failed}
                 for p in self.policy.peers.values()}
        return {**asdict(self.counters), "waiting_for_kv": len(self._remote), "prefills": peers}

    def close(self) -> None:
        self.client.close()

    # -- internals -------------------------------------------------------------------------
    def _collect_rpc(self, now: float) -> None:
        # In the order they happened: an old failed outcome must not undo a newer good check.
        events = [*self.client.drain_health(), *self.client.drain_results()]
        for event in sorted(events, key=lambda e: e.at):
            if isinstance(event, HealthReport):
                self.policy.health_checked(event.url, event.ok, event.queue, now)
            else:
                self._on_result(event, now)

    def _on_result(self, result: PrefillResult, now: float) -> None:
        self.policy.finished(result.url, result.ok, now)
        where = self._where.get(result.req_id)
        d_token = self._awaiting_p_token.pop(result.req_id, None)
        if result.first_token is not None:  # P's answer may come after the KV, even after D
            if where is not None:           # finished the request
                where["p_first_token"] = result.first_token
            elif d_token is not None:
                self._compare_first_tokens(result.req_id, result.first_token, d_token)
        rec = self._remote.get(result.req_id)
        if rec is None:
            return
        if not result.ok:
            log.warning("pdpush: %s: remote prefill on %s failed: %s",
                        result.req_id, result.url, result.error)
            self._where[result.req_id]["error"] = result.error
            rec.give_up = rec.give_up or not result.may_have_written

    def _check_first_token(self, req_id: str, where: dict[str, Any], output: list[int]) -> None:
        """Greedy: P's first token must equal D's; compared now or once P's answer arrives."""
        p_token = where.get("p_first_token")
        if not where.pop("greedy", False) or not output:
            return
        if p_token is None:
            self._awaiting_p_token[req_id] = output[0]
        elif not self._compare_first_tokens(req_id, p_token, output[0]):
            where["first_token_mismatch"] = True

    def _compare_first_tokens(self, req_id: str, p_token: int, d_token: int) -> bool:
        """A difference under greedy sampling suggests corrupt or missing KV: log and count."""
        self.counters.first_token_checked += 1
        if p_token == d_token:
            return True
        self.counters.first_token_mismatch += 1
        log.error("pdpush: %s: P's first token %d != D's %d (greedy): suspected KV corruption",
                  req_id, p_token, d_token)
        return False


def _sampling_for_p(sp: Any) -> dict[str, Any]:
    """The sampling fields P needs for its one token (its value is only checked when greedy)."""
    if sp is None:
        return {"temperature": 0.0}
    fields = {"temperature": sp.temperature, "top_p": sp.top_p, "seed": sp.seed}
    if sp.top_k and sp.top_k > 0:
        fields["top_k"] = sp.top_k
    return {k: v for k, v in fields.items() if v is not None}
