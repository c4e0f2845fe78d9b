"""P's scheduler half: read the push target, plan each step's blocks, hold blocks until pushed.

A prefill arrives from D as an ordinary completion with the push target in
`kv_transfer_params`. Every step that computes part of its prompt, the blocks that became
complete (and, when the prompt completes, the last partial block) are handed to the workers,
which WRITE them layer by layer. P's own prefix-cache hits are pushed too (D lacks them); D's
are not (`skip_tokens`). When the request finishes, its blocks stay allocated until the workers
report every WRITE complete (finished_sending).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pdpush.connector.auth import ReplayGuard
from pdpush.connector.config import PdpushConfig
from pdpush.connector.faults import FaultHooks
from pdpush.rpc.release import RELEASED_KEY, Tombstones, release_fields, release_query
from pdpush.connector.metadata import (
    Forbidden, ParamsError, PrefillStepMeta, PushTarget, PushTask, blocks_for_tokens,
)
from pdpush.connector.stats import serve_scheduler_stats
from pdpush.connector.timing import PushTimes
from pdpush.vllm_api import BlockAccess, RequestView, StepView, Transfers

log = logging.getLogger("vllm.pdpush.prefill")  # under vllm: shown in its log


@dataclass
class Push:
    target: PushTarget
    num_prompt: int
    next_block: int  # first prompt block not yet handed to the workers
    post_until: float = float("inf")  # P's monotonic clock: no WRITE posted after it
    planned_last: bool = False
    p_block_ids: list[int] = field(default_factory=list)  # P's blocks, from the steps (StepView)
    times: PushTimes = field(default_factory=lambda: PushTimes(time.monotonic()))


@dataclass
class PrefillScheduler:
    block_size: int
    config: PdpushConfig = field(default_factory=PdpushConfig)
    stats_server: Any = None
    _pushes: dict[str, Push] = field(default_factory=dict)
    _errors: dict[str, str] = field(default_factory=dict)
    _held: set[str] = field(default_factory=set)
    _stopped: dict[str, PushTarget] = field(default_factory=dict)
    faults: FaultHooks | None = field(init=False)
    tombstones: Tombstones = field(default_factory=Tombstones)
    _release_answers: dict[str, bool] = field(default_factory=dict)  # P req id -> released
    pushed_requests: int = 0
    planned_tasks: int = 0  # (request, step) pairs handed to the workers: chunks pushed
    rejected_requests: int = 0
    forbidden_requests: int = 0  # unsigned, badly signed or replayed targets

    def __post_init__(self) -> None:
        self.faults = FaultHooks.from_dir(self.config.fault_hooks_dir)
        self.keys = self.config.keys()
        self.replays = ReplayGuard()
        if self.keys is None:
            log.warning("pdpush: P has no shared key (auth_key_file / auth_key_env): it writes "
                        "wherever any caller of its OpenAI port tells it to")

    def _admit(self, req_id: str, target: PushTarget) -> None:
        """Authoritative check of a signed target's nonce (also done by connector/auth_middleware.py,
        which a request reaching the engine by another way would have skipped)."""
        if self.keys is None:
            return
        if refusal := target.replay_refusal(self.replays, req_id):
            raise Forbidden(f"kv_transfer_params.pdpush: {refusal}")

    def get_num_new_matched_tokens(self, request: RequestView, num_computed: int) -> tuple[int, bool]:
        """P loads nothing; this is where the push target is read and validated (idempotent).
        The budget becomes a time on P's monotonic clock here, at the request's arrival in P's
        engine, less the stop margin (docs/architecture.md, "Lease and quarantine")."""
        req_id = request.request_id
        if req_id in self._pushes or req_id in self._errors or req_id in self._release_answers:
            return 0, False
        if (asked := release_query(request.kv_transfer_params)) is not None:
            self._answer_release(req_id, *asked)
            return 0, False
        if self.faults is not None:
            self.faults.at("before_accept")
        try:
            target = PushTarget.from_params(request.kv_transfer_params, self.keys)
            if target is None:
                return 0, False
            if target.d_req_id in self.tombstones:
                raise ParamsError("D released this request's blocks already (asked P first)")
            self._admit(req_id, target)
            target.check_prompt(request.num_prompt_tokens, self.block_size)
            if target.budget_s <= self.config.push_stop_margin_s:
                raise ParamsError(f"budget {target.budget_s}s is not above P's push_stop_margin_s "
                                  f"({self.config.push_stop_margin_s}s)")
        except ParamsError as exc:
            log.error("pdpush: rejecting push for %s: %s", req_id, exc)
            self._errors[req_id] = str(exc)
            self.rejected_requests += 1
            self.forbidden_requests += isinstance(exc, Forbidden)
            return 0, False
        post_until = time.monotonic() + target.budget_s - self.config.push_stop_margin_s
        self._pushes[req_id] = Push(target, request.num_prompt_tokens,
                                    target.skip_tokens // self.block_size, post_until)
        return 0, False

    def _answer_release(self, req_id: str, d_req_id: str, signature: Any) -> None:
        """D asks whether it may release d_req_id's blocks (rpc/release.py); with a key, only
        a question D signed is answered (a tombstone refuses that request's push)."""
        if self.keys is not None and not self.keys.verify(release_fields(d_req_id), signature):
            log.error("pdpush: refusing an unsigned release question for %s", d_req_id)
            self._errors[req_id] = "kv_transfer_params.pdpush_release: not signed by D"
            self.forbidden_requests += 1
            return
        busy = any(push.target.d_req_id == d_req_id for push in self._pushes.values())
        if not busy:
            self.tombstones.add(d_req_id)
        self._release_answers[req_id] = not busy

    def update_state_after_alloc(self, request: RequestView, block_ids: list[int],
                                 num_external: int) -> None:
        return  # P loads nothing

    def build_meta(self, step: StepView) -> PrefillStepMeta:
        meta = PrefillStepMeta(stopped=self._stopped,
                               preempted=[r for r in step.preempted if r in self._pushes])
        self._stopped = {}
        for req_id, ids in step.new_blocks.items():
            push = self._pushes.get(req_id)
            if push is not None:
                push.p_block_ids = ids if req_id in step.resumed else push.p_block_ids + ids
        now = time.monotonic()
        for req_id, (computed, num_new) in step.scheduled.items():
            push = self._pushes.get(req_id)
            if push is None or push.planned_last:
                continue
            push.times.prefill_start = push.times.prefill_start or now
            task = self.plan(req_id, push, computed + num_new)
            if task is not None:
                meta.tasks.append(task)
                self.planned_tasks += 1
        return meta

    def plan(self, req_id: str, push: Push, computed_after: int) -> PushTask | None:
        """Blocks complete once this step's tokens are in; all remaining ones at the end."""
        last = computed_after >= push.num_prompt
        end = blocks_for_tokens(push.num_prompt, self.block_size) if last else \
            computed_after // self.block_size
        start = push.next_block
        if end <= start and not last:
            return None
        push.next_block = max(start, end)
        push.planned_last = last
        if last:
            push.times.last_chunk = time.monotonic()
        p_ids = push.p_block_ids[start:end] if end > start else []
        return PushTask(req_id, push.target, p_ids, list(push.target.d_block_ids[start:end]), last,
                        post_until=push.post_until, admitted=push.times.admitted)

    def request_finished(self, request: RequestView) -> tuple[bool, dict[str, Any] | None]:
        req_id = request.request_id
        if req_id in self._release_answers:
            return False, {RELEASED_KEY: self._release_answers.pop(req_id)}
        error = self._errors.pop(req_id, None)
        if error is not None:
            return False, {"pdpush_error": error}
        push = self._pushes.get(req_id) or self._unseen_push(request)
        if push is None:
            return False, None
        if not push.planned_last:
            self._stopped[req_id] = push.target
        self._held.add(req_id)
        self.pushed_requests += 1
        return True, {"pdpush": {"pushed": push.planned_last,
                                 "p_ms": push.times.to_params(time.monotonic())}}

    def _unseen_push(self, request: RequestView) -> Push | None:
        """A push request aborted before P looked at it: still stop it, so D hears of it."""
        try:
            target = PushTarget.from_params(request.kv_transfer_params, self.keys)
        except ParamsError:
            return None
        if target is None:
            return None
        push = self._pushes[request.request_id] = Push(target, request.num_prompt_tokens, 0)
        return push

    def bind_blocks(self, blocks: BlockAccess) -> None:
        self.stats_server = serve_scheduler_stats(self.config, "P", blocks, self.stats)

    def update_connector_output(self, transfers: Transfers) -> None:
        for req_id in transfers.sent:
            self._held.discard(req_id)
            self._pushes.pop(req_id, None)

    def has_pending(self) -> bool:
        return bool(self._held)

    def stats(self) -> dict[str, Any]:
        return {"pushed_requests": self.pushed_requests, "planned_tasks": self.planned_tasks,
                "rejected_requests": self.rejected_requests,
                "forbidden_requests": self.forbidden_requests,
                "held_requests": len(self._held), "tracked_requests": len(self._pushes)}

    def close(self) -> None:
        if self.stats_server is not None:
            self.stats_server.close()
