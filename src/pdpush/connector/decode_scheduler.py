"""D's scheduler half: a request's whole life on D, one `DecodeRequest` record per request.

Life of a remote prefill on D (request R), by vLLM hook:
1. `get_num_new_matched_tokens`: the policy picks a P (CHOSEN); vLLM is told the uncached tokens
   will arrive asynchronously, so it allocates R's blocks and parks R in WAITING_FOR_REMOTE_KVS.
   A local decision makes R LOCAL (also for inputs P cannot reproduce from token ids: LoRA,
   multimodal, prompt embeddings). vLLM may call this hook again for the same request, so it
   only reads: the rpc outcomes are applied in the other hooks.
2. `update_state_after_alloc`: D's block ids are known; the do_prefill call is queued on the rpc
   thread (the scheduler never waits) and the workers are told to expect R (WAITING_FOR_KV).
3. `update_connector_output`: the workers report R received once P's completion notification
   arrived (READY), or failed (FALLBACK: vLLM recomputes R locally, or fails it: on_failure).
4. `build_meta`: if P errs, is gone, or the lease runs out (budget + grace on D's monotonic
   clock), the workers are told to give R up. When the lease ran out without P's word, the blocks
   P may write are held first (connector/quarantine.py), so that vLLM recomputing or failing R
   never hands them to another request while a WRITE may still land.
5. `request_finished`: R's placement goes back to the client as `kv_transfer_params.pdpush` (with
   the stage timings of pdpush.connector.timing, also kept for /stats) and the record is
   dropped, except: aborted while WAITING_FOR_KV (blocks held until step 3), or decoded from
   P's KV before P's answer arrived (AWAITING_P_ANSWER: P's first token is still to compare and
   its stage times still to record; with on_first_token_mismatch other than "log" its blocks
   leave the prefix cache). D keeps stepping until that answer comes (`has_pending`), at most
   until the lease ends, so that an idle D still records it.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from pdpush.connector.auth import new_nonce
from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_request import DecodeRequest, Placement, Status
from pdpush.connector.metadata import (
    CLIENT_TOKENS_KEY, DecodeStepMeta, ParamsError, PushTarget, client_mode,
)
from pdpush.connector.quarantine import Quarantine
from pdpush.connector.stats import serve_scheduler_stats
from pdpush.connector.timing import DecodeTimes
from pdpush.policy import Policy
from pdpush.probe import batch_stats_from
from pdpush.rpc.release import release_fields
from pdpush.rpc.prefill_client import (
    HealthReport, PrefillClient, PrefillJob, PrefillResult, ReleaseAnswer,
)
from pdpush.vllm_api import BlockAccess, RequestView, Sampling, StepView, Transfers

log = logging.getLogger("vllm.pdpush.decode")  # under vllm: shown in its log
RECENT_TIMINGS = 128  # finished requests whose stage timings /stats shows


@dataclass
class DecodeCounters:
    local: int = 0
    remote: int = 0
    remote_ok: int = 0
    fallback: int = 0  # remote prefill failed, request recomputed on D (or failed)
    aborted_waiting: int = 0
    first_token_checked: int = 0
    first_token_mismatch: int = 0  # plain greedy: P's token differs from D's = suspected corruption
    # Notifications the workers ignored: not from the chosen P (nonce, agent or signature).
    notifs_refused: int = 0


@dataclass
class DecodeScheduler:
    config: PdpushConfig
    block_size: int
    engine_id: str
    client: Any = None  # PrefillClient; tests pass a stand-in
    ranks: int = 1  # D's tensor-parallel workers
    quarantine: Quarantine = field(init=False)
    instance_id: str = ""  # this start of D (P checks it against the side channel's)
    policy: Policy = field(init=False)
    counters: DecodeCounters = field(default_factory=DecodeCounters)
    stats_server: Any = None
    blocks: BlockAccess | None = None  # D's KV cache manager (prefix-cache eviction)
    _requests: dict[str, DecodeRequest] = field(default_factory=dict)
    _expect: dict[str, list[int]] = field(default_factory=dict)  # for the next step's workers
    _before_first_step: set[str] = field(default_factory=set)  # prefilled, not yet scheduled
    recent: deque = field(default_factory=lambda: deque(maxlen=RECENT_TIMINGS))
    _nonces: dict[str, str] = field(default_factory=dict)  # their nonces, for the workers

    def __post_init__(self) -> None:
        self.keys = self.config.keys()
        self.side_channel = f"{self.config.side_channel_address()}:{self.config.side_channel_port}"
        self.policy = Policy.for_urls(self.config.policy_config(), self.config.prefill_urls)
        self.quarantine = Quarantine(self.ranks)
        if self.client is None:
            self.client = PrefillClient(self.config.prefill_urls, self.config.health_interval_s)

    # -- vLLM hooks, in the order a request meets them ----------------------------------------
    def get_num_new_matched_tokens(self, request: RequestView, num_computed: int) -> tuple[int, bool]:
        req_id = request.request_id
        rec = self._requests.get(req_id)
        if rec is not None and rec.status in (Status.WAITING_FOR_KV, Status.FALLBACK):
            return 0, False
        decided = rec.times.decided if rec is not None and rec.times else time.monotonic()
        try:
            mode, tokens = self._client_hint(request)
        except ParamsError as exc:
            self._local(req_id, Placement("local", pdpush_error=str(exc)), decided)
            return 0, False
        uncached = request.num_prompt_tokens - num_computed
        if mode == "local":
            url, reason = None, "client_asked_local"
        elif request.beyond_tokens:  # P is sent token ids only: it would compute other KV
            url, reason = None, "+".join(request.beyond_tokens)
        elif request.num_tokens > request.num_prompt_tokens:  # preempted and resumed: has output
            url, reason = None, "resumed"
        else:
            decision = self.policy.choose(uncached, time.monotonic(), force_remote=mode == "remote",
                                          refusing=self.client.refusing())
            url, reason = decision.url, decision.reason
        if url is None:
            self._local(req_id, Placement("local", reason=reason), decided)
            return 0, False
        self._requests[req_id] = DecodeRequest(req_id, Status.CHOSEN, url=url,
                                               foreign_kv=tokens is not None,
                                               times=DecodeTimes(decided))
        return uncached, True

    def update_state_after_alloc(self, request: RequestView, block_ids: list[int],
                                 num_external: int) -> None:
        rec = self._requests.get(request.request_id)
        if rec is None or rec.status is not Status.CHOSEN:
            return
        if num_external == 0:
            self._drop(rec)
            return
        assert rec.url is not None
        skip = request.num_prompt_tokens - num_external
        budget, now = self.config.prefill_timeout_s, time.monotonic()
        deadline = now + budget
        target = PushTarget(rec.req_id, self.engine_id, self.side_channel, tuple(block_ids),
                            skip, self.block_size, budget, new_nonce(), self.instance_id, now)
        _, tokens = self._client_hint(request)  # validated in the match step
        self.client.submit(PrefillJob(
            rec.req_id, rec.url, tokens or list(request.prompt_token_ids),
            _sampling_for_p(request.sampling), target.to_params(self.keys), deadline,
        ))
        self.policy.started(rec.url)
        rec.status, rec.lease_end = Status.WAITING_FOR_KV, deadline + self.config.lease_grace_s
        rec.placement = Placement("remote", url=rec.url, skip_tokens=skip)
        rec.push_blocks = tuple(block_ids[skip // self.block_size:])
        sp = request.sampling
        rec.plain_greedy = sp is not None and sp.temperature < 1e-5 and sp.plain
        self._expect[rec.req_id] = list(rec.push_blocks)
        self._nonces[rec.req_id] = target.nonce
        self.counters.remote += 1

    def build_meta(self, step: StepView | None) -> DecodeStepMeta:
        self._collect_rpc()
        now = time.monotonic()
        give_up, late = [], []
        for rec in self._requests.values():
            if rec.foreign_kv and rec.status is Status.READY:
                self._evict(rec)  # vLLM caches arrived blocks when R resumes: undo it every step
            if rec.status is Status.AWAITING_P_ANSWER and now > rec.lease_end:
                late.append(rec)  # P's call is abandoned by then: its answer will not come
            if rec.status is not Status.WAITING_FOR_KV:
                continue
            if not rec.give_up and now > rec.lease_end:
                log.warning("pdpush: %s: no KV from %s before the lease ended", rec.req_id, rec.url)
                assert rec.url is not None
                self.quarantine.hold(rec.req_id, rec.url, list(rec.push_blocks), now, rec.notified)
                rec.give_up = True
            if rec.give_up:
                give_up.append(rec.req_id)
        for rec in late:
            self._drop(rec)
        if step is not None and self._before_first_step:
            self._note_first_steps(step)
        for req_id, url in self.quarantine.to_ask(now, self.config.health_interval_s):
            sig = self.keys.sign(release_fields(req_id)) if self.keys is not None else ""
            self.client.ask_release(url, req_id, sig)
        meta = DecodeStepMeta(expect=self._expect, give_up=give_up, nonces=self._nonces)
        if self.config.probe.enabled and step is not None:
            meta.batch_stats = batch_stats_from(step)
        self._expect, self._nonces = {}, {}
        return meta

    def update_connector_output(self, transfers: Transfers) -> None:
        now = time.monotonic()
        self.counters.notifs_refused += transfers.counts.get("notifs_refused", 0)
        self._collect_rpc()
        self.quarantine.confirmed(transfers.notified)
        for req_id, n in transfers.notified.items():
            if (rec := self._requests.get(req_id)) is not None:
                rec.notified += n
        for req_id in transfers.received:
            rec = self._requests.get(req_id)
            if rec is None or rec.status is not Status.WAITING_FOR_KV:
                continue
            if rec.times is not None:
                rec.times.kv_seen = now
                rec.times.kv_notif, rec.times.p_worker = transfers.arrivals.get(req_id, (0.0, ()))
            self._before_first_step.add(req_id)
            if rec.aborted:
                self._drop(rec)  # vLLM frees R's blocks now: nothing more to track
            elif req_id in transfers.failed or not transfers.failed_blocks.isdisjoint(
                    rec.push_blocks):  # failed blocks: how vLLM 0.26 reports a failure
                self.counters.fallback += 1
                rec.status = Status.FALLBACK
                assert rec.placement is not None
                rec.placement.prefill = "fallback"
            else:
                self.counters.remote_ok += 1
                rec.status = Status.READY

    def request_finished(self, request: RequestView) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        self._collect_rpc()
        rec = self._requests.get(req_id)
        if rec is None:
            return False, None
        if rec.status is Status.WAITING_FOR_KV:  # hold the blocks until P confirms or lease ends
            rec.aborted = True
            self.counters.aborted_waiting += 1
            if self.client.cancel(req_id):
                log.info("pdpush: %s aborted while waiting for KV; cancelled do_prefill", req_id)
            return True, None
        if rec.placement is None:  # CHOSEN, never allocated
            self._drop(rec)
            return False, None
        self.counters.local += rec.placement.prefill == "local"
        if rec.foreign_kv and rec.status is Status.READY:
            self._evict(rec)
        if rec.times is not None:
            rec.placement.timing = rec.times.to_params()
            rec.recent = {"prefill": rec.placement.prefill, **rec.placement.timing}
            self.recent.append(rec.recent)
        self._check_first_token(rec, request.output_token_ids)
        if rec.status is Status.READY and not rec.p_answered:
            rec.status = Status.AWAITING_P_ANSWER
        else:
            self._drop(rec)
        return False, {"pdpush": rec.placement.to_params()}

    def bind_blocks(self, blocks: BlockAccess) -> None:
        self.quarantine.blocks = blocks
        self.blocks = blocks
        self.stats_server = serve_scheduler_stats(self.config, "D", blocks, self.stats)

    def has_pending(self) -> bool:
        """While blocks are held vLLM must keep stepping: each step polls P's notifications
        and asks P about the held requests, even when D has no request of its own. The same
        while a finished request awaits P's answer (bounded by its lease)."""
        return self.quarantine.stats()["held_requests"] > 0 or any(
            r.status is Status.AWAITING_P_ANSWER for r in self._requests.values())

    def stats(self) -> dict[str, Any]:
        """Counters, the policy's inputs per P, and what is waiting (for /stats and tests)."""
        now, refusing = time.monotonic(), self.client.refusing()
        peers = {p.url: {"inflight": p.inflight, "queue": p.queue, "healthy": p.available(now),
                         "refusing": p.url in refusing,
                         "breaker_open": p.open_until is not None,
                         "consecutive_failures": p.failures,
                         "completed": p.completed, "failed": p.failed}
                 for p in self.policy.peers.values()}
        waiting = sum(r.status is Status.WAITING_FOR_KV for r in self._requests.values())
        return {**asdict(self.counters), "waiting_for_kv": waiting, **self.quarantine.stats(),
                "prefills": peers, "recent": list(self.recent)}

    def close(self) -> None:
        self.client.close()
        self.quarantine.close()
        if self.stats_server is not None:
            self.stats_server.close()

    # -- internals -------------------------------------------------------------------------
    def _drop(self, rec: DecodeRequest) -> None:
        rec.status = Status.DONE
        del self._requests[rec.req_id]
        self._before_first_step.discard(rec.req_id)

    def _local(self, req_id: str, placement: Placement, decided: float) -> None:
        self._requests[req_id] = DecodeRequest(req_id, Status.LOCAL, placement,
                                               times=DecodeTimes(decided))
        self._before_first_step.add(req_id)

    def _note_first_steps(self, step: StepView) -> None:
        """The first step that runs a prefilled (or local) request: D's side of its TTFT."""
        now = time.monotonic()
        for req_id in [r for r in self._before_first_step if r in step.scheduled]:
            self._before_first_step.discard(req_id)
            rec = self._requests.get(req_id)
            if rec is not None and rec.times is not None:
                rec.times.first_step = now

    def _client_hint(self, request: RequestView) -> tuple[str, list[int] | None]:
        """The client's routing hint; tokens for P (test seam) also need the request's own
        cache_salt, so that no request without that salt can ever match the foreign KV."""
        mode, tokens = client_mode(request.kv_transfer_params, self.config.test_allow_prefill_tokens)
        if tokens is not None and not request.cache_salt:
            raise ParamsError(f"kv_transfer_params.{CLIENT_TOKENS_KEY} needs a cache_salt")
        return mode, tokens

    def _evict(self, rec: DecodeRequest) -> None:
        """Take R's pushed blocks out of D's prefix cache (no-op for blocks not cached)."""
        if self.blocks is not None and rec.push_blocks:
            self.blocks.evict(rec.push_blocks)

    def _collect_rpc(self) -> None:
        # In the order they happened, each at the time it was known: an old failed outcome must
        # not undo a newer good check.
        events = [*self.client.drain_health(), *self.client.drain_results()]
        for event in sorted(events, key=lambda e: e.at):
            if isinstance(event, HealthReport):
                self.policy.health_checked(event.url, event.ok, event.queue, event.at)
                if event.refused:
                    self._p_gone(event.url, event.at)
            elif isinstance(event, ReleaseAnswer):
                self.quarantine.answered(event.req_id, event.released)
            else:
                self._on_result(event)

    def _p_gone(self, url: str, at: float) -> None:
        """P's process ended: release what D held for it, and stop waiting for the requests
        whose call D itself ended (client aborts); the others' calls report the reset. No new
        request goes there until it answers again (its breaker, pdpush.policy)."""
        self.policy.gone(url, at)
        self.quarantine.p_gone(url, at)
        for rec in self._requests.values():
            if rec.status is Status.WAITING_FOR_KV and rec.url == url and rec.aborted:
                rec.give_up = True

    def _on_result(self, result: PrefillResult) -> None:
        """P's answer to do_prefill; it may come after the KV, even after D finished R."""
        if result.cancelled:
            self.policy.cancelled(result.url)
        else:
            self.policy.finished(result.url, result.ok, result.at)
        if result.p_gone:
            self._p_gone(result.url, result.at)
        rec = self._requests.get(result.req_id)
        if rec is None or rec.placement is None:
            return
        rec.p_answered = True
        if rec.times is not None:
            rec.times.sent, rec.times.answered, rec.times.p_sched = result.sent_at, result.at, result.p_ms
            if rec.recent is not None:  # P answered after D finished: /stats still gets it
                rec.recent.update(rec.times.to_params())
        if rec.status is Status.AWAITING_P_ANSWER:
            self._drop(rec)
            if result.first_token is not None and rec.d_first_token is not None:
                self._compare_first_tokens(rec, result.first_token, rec.d_first_token)
            return
        if result.first_token is not None:
            rec.placement.p_first_token = result.first_token
        if rec.status is Status.WAITING_FOR_KV and not result.ok:
            log.warning("pdpush: %s: remote prefill on %s failed: %s",
                        rec.req_id, result.url, result.error)
            rec.placement.error = result.error
            rec.give_up = rec.give_up or not result.may_have_written or result.p_gone

    def _check_first_token(self, rec: DecodeRequest, output: Any) -> None:
        """Where the result is defined (plain greedy, D decoded from P's KV) P's first token must
        equal D's; compared now, or once P's answer arrives."""
        assert rec.placement is not None
        if not rec.plain_greedy or rec.status is not Status.READY or not output:
            return
        p_token = rec.placement.p_first_token
        if p_token is None:
            if not rec.p_answered:  # P's answer is still to come: compared when it arrives
                rec.d_first_token = output[0]
                if self.config.on_first_token_mismatch != "log":
                    self._evict(rec)  # D frees the blocks now: unverified KV is not left cached
        elif not self._compare_first_tokens(rec, p_token, output[0]):
            rec.placement.first_token_mismatch = True

    def _compare_first_tokens(self, rec: DecodeRequest, p_token: int, d_token: int) -> bool:
        """A difference suggests corrupt or misplaced KV: count, log, and act as configured."""
        self.counters.first_token_checked += 1
        if p_token == d_token:
            return True
        self.counters.first_token_mismatch += 1
        log.error("pdpush: %s: P's first token %d != D's %d (greedy): suspected KV corruption",
                  rec.req_id, p_token, d_token)
        action = self.config.on_first_token_mismatch
        if action != "log" and rec.status is not Status.DONE:  # DONE: evicted when D finished
            self._evict(rec)
        if action == "error":
            assert rec.url is not None and rec.placement is not None
            self.policy.failed(rec.url, time.monotonic())
            rec.placement.error = f"P's first token {p_token} != D's {d_token}"
        return False


def _sampling_for_p(sp: Sampling | None) -> dict[str, Any]:
    """The sampling fields P needs for its one token (its value is only checked when greedy)."""
    if sp is None:
        return {"temperature": 0.0}
    fields = {"temperature": sp.temperature, "top_p": sp.top_p, "seed": sp.seed}
    if sp.top_k and sp.top_k > 0:
        fields["top_k"] = sp.top_k
    return {k: v for k, v in fields.items() if v is not None}
