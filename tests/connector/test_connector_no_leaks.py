"""No per-request state survives its request: thousands of mixed requests through D's and P's
scheduler and worker halves (real NIXL agents, CPU tensors; a stand-in for the do_prefill HTTP
call that hands each job to P's scheduler), then every container reachable from every half is
searched for any request id. A new dict, set or list that forgets to drop an entry fails here.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import pytest
from connector_fakes import FakeClient

torch = pytest.importorskip("torch")
pytest.importorskip("nixl")

from pdpush.local.cluster import free_port  # noqa: E402
from test_connector_push_workers import connect  # noqa: E402
from pdpush.connector.config import PdpushConfig  # noqa: E402
from pdpush.connector.decode_scheduler import DecodeScheduler  # noqa: E402
from pdpush.connector.decode_worker import DecodeWorker  # noqa: E402
from pdpush.connector.prefill_scheduler import PrefillScheduler  # noqa: E402
from pdpush.connector.prefill_worker import PrefillWorker  # noqa: E402
from pdpush.rpc.prefill_client import PrefillClient, PrefillJob, PrefillResult  # noqa: E402
from pdpush.vllm_api import RequestView, Sampling, StepView, Transfers  # noqa: E402

BS, BLOCKS, LAYERS, WIDTH = 4, 64, ["l0", "l1"], 8
KINDS = ("remote_ok", "local", "p_rejects", "p_aborts", "abort_waiting", "late_p_answer")


def held_ids(obj, ids: set[str], path: str = "", seen: set[int] | None = None) -> list[str]:
    """Paths inside `obj` (pdpush objects, dicts, sets, lists, ...) where a request id occurs."""
    seen = set() if seen is None else seen
    if isinstance(obj, str):
        return [path] if obj in ids else []
    if id(obj) in seen or isinstance(obj, (int, float, bytes, type(None))):
        return []
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in obj.items()] + [(f"{path}.keys()", k) for k in obj]
    elif isinstance(obj, (list, tuple, set, frozenset, deque)):
        items = [(f"{path}[]", v) for v in obj]
    elif type(obj).__module__.startswith("pdpush."):
        items = [(f"{path}.{k}", v) for k, v in vars(obj).items()]
    else:
        return []  # NIXL agents, tensors, threads, this test's stand-ins: not pdpush's state
    return [p for sub_path, value in items for p in held_ids(value, ids, sub_path, seen)]


class LoopbackRpc(FakeClient):
    """D's rpc client as the scheduler sees it; `submit` makes the job a request on P."""

    def __init__(self, p_side: "PSide") -> None:
        super().__init__()
        self.p_side = p_side

    def submit(self, job: PrefillJob) -> None:
        self.p_side.admit(job)

    def cancel(self, req_id: str) -> bool:
        self.p_side.abort(req_id)
        return True


@dataclass
class PSide:
    sched: PrefillScheduler
    worker: PrefillWorker
    kv: dict
    kinds: dict
    rpc: LoopbackRpc | None = None
    running: dict = field(default_factory=dict)  # P id -> (view, D id)
    finished: set = field(default_factory=set)  # this step's, for the workers
    late: list = field(default_factory=list)  # answers held back to arrive after D finished

    def admit(self, job: PrefillJob) -> None:
        params = job.kv_transfer_params
        if self.kinds[job.req_id] == "p_rejects":  # a target whose blocks do not fit the prompt
            target = params["pdpush"]
            params = {"pdpush": {**target, "d_block_ids": target["d_block_ids"][:-1]}}
        view = RequestView("p" + job.req_id, len(job.prompt_token_ids), len(job.prompt_token_ids),
                           job.prompt_token_ids, params)
        self.sched.get_num_new_matched_tokens(view, 0)
        self.running[view.request_id] = (view, job.req_id)

    def abort(self, d_id: str) -> None:
        if "p" + d_id in self.running:
            self._finish("p" + d_id, ok=False, error="cancelled by D")

    def _finish(self, p_id: str, ok: bool, error: str = "") -> None:
        view, d_id = self.running.pop(p_id)
        _, params = self.sched.request_finished(view)
        self.finished.add(p_id)
        if params and "pdpush_error" in params:
            result = PrefillResult(d_id, "http://p", False, error=params["pdpush_error"],
                                   may_have_written=False)
        else:
            result = PrefillResult(d_id, "http://p", ok, first_token=5 if ok else None, error=error)
        (self.late if self.kinds[d_id] == "late_p_answer" else self.rpc.results).append(result)

    def step(self) -> None:
        """Compute every running prompt in one step; a p_aborts request ends after half."""
        scheduled = {p: (0, view.num_prompt_tokens // (2 if self.kinds[d] == "p_aborts" else 1))
                     for p, (view, d) in self.running.items()}
        meta = self.sched.build_meta(StepView(scheduled, sum(n for _, n in scheduled.values()),
                                              new_blocks={p: list(range(8)) for p in scheduled}))
        self.worker.bind(meta)
        for name in LAYERS:
            self.worker.save_kv_layer(name, self.kv[name])
        self.worker.wait_for_save()
        for p_id in list(self.running):
            self._finish(p_id, ok=self.kinds[self.running[p_id][1]] != "p_aborts", error="aborted")
        self.sched.update_connector_output(self.worker.transfer_results(self.finished))
        self.finished = set()


def test_every_request_leaves_no_state_behind():
    port = free_port()
    config = PdpushConfig(prefill_urls=("http://p",), remote_threshold_tokens=8,
                          side_channel_port=port, max_inflight_per_prefill=10**6,
                          retry_after_s=1e-6)  # a failed P is a candidate again at once
    n = 2000
    kinds = {f"r{i}": KINDS[i % len(KINDS)] for i in range(n)}
    d_worker = DecodeWorker(config, "d", 0, BLOCKS)
    p_worker = PrefillWorker(config, "p", 0, BLOCKS)
    p_kv = {name: torch.randn(BLOCKS, 2, BS, WIDTH) for name in LAYERS}
    d_kv = {name: torch.zeros(BLOCKS, 2, BS, WIDTH) for name in LAYERS}  # alive while NIXL writes
    d_worker.register_kv_caches(d_kv)
    p_worker.register_kv_caches(p_kv)
    connect(p_worker, d_worker, port, engine="d")
    p_sched = PrefillScheduler(BS, PdpushConfig())
    p_side = PSide(p_sched, p_worker, p_kv, kinds)
    p_side.rpc = LoopbackRpc(p_side)
    d_sched = DecodeScheduler(config, BS, "d", client=p_side.rpc)
    try:
        drive(d_sched, d_worker, p_side, kinds)
    finally:
        p_worker.close()
        d_worker.close()
    assert d_sched.counters.remote_ok == kinds_count(kinds, "remote_ok", "late_p_answer")
    # Greedy first-token checks, the late ones after D finished (records in AWAITING_P_ANSWER).
    assert d_sched.counters.first_token_checked == d_sched.counters.remote_ok
    assert d_sched.counters.fallback == kinds_count(kinds, "p_rejects", "p_aborts")
    assert d_sched.counters.aborted_waiting == kinds_count(kinds, "abort_waiting")
    ids = set(kinds) | {"p" + r for r in kinds}
    for half in (d_sched, d_worker, p_sched, p_worker):
        assert held_ids(half, ids, type(half).__name__) == []


def through_vllm(t: Transfers) -> Transfers:
    """The worker's report as vLLM 0.32's scheduler gets it back: failures per request, the
    notifications, no failed blocks (this fake gives every request the same D blocks, which
    vLLM never does)."""
    return Transfers(t.sent, t.received, t.failed, t.notified)


def kinds_count(kinds: dict, *wanted: str) -> int:
    return sum(k in wanted for k in kinds.values())


def drive(d_sched, d_worker, p_side, kinds) -> None:
    """Admit requests in waves; step D and P until every request has ended on both."""
    waiting = deque(kinds)
    running: dict[str, RequestView] = {}  # D requests not finished yet
    deadline = time.monotonic() + 120
    while (waiting or running or p_side.running or p_side.sched.has_pending()
           or p_side.late) and time.monotonic() < deadline:
        for _ in range(min(40, len(waiting))):
            req_id = waiting.popleft()
            n = 4 if kinds[req_id] == "local" else 24
            view = RequestView(req_id, n, n, list(range(n)), None, [], Sampling(0.0))
            num, remote = d_sched.get_num_new_matched_tokens(view, 0)
            if remote:
                d_sched.update_state_after_alloc(view, list(range(8, 14)), num)
            running[req_id] = view
        meta = d_sched.build_meta(None)
        d_worker.bind(meta)
        for req_id in [r for r in meta.expect if kinds[r] == "abort_waiting"]:
            assert d_sched.request_finished(running.pop(req_id))[0] is True  # blocks held
        p_side.step()
        transfers = through_vllm(d_worker.transfer_results(set()))
        transfers.arrivals = d_worker.take_arrivals()  # vLLM: build_connector_worker_meta
        d_sched.update_connector_output(transfers)
        for req_id, view in list(running.items()):
            rec = d_sched._requests.get(req_id)
            if rec is None or rec.status.name in ("READY", "LOCAL", "FALLBACK"):
                view.output_token_ids = [5]
                d_sched.request_finished(running.pop(req_id))
        p_side.rpc.results += p_side.late  # P's answers that come after D finished
        p_side.late = []
    assert not (waiting or running or p_side.running), "requests did not finish in time"


def test_a_call_that_fails_at_once_leaves_nothing_in_the_client():
    client = PrefillClient((), health_interval_s=60)
    url = f"http://127.0.0.1:{free_port()}"
    try:
        for i in range(200):
            client.submit(PrefillJob(f"r{i}", url, [1], {}, {}, time.monotonic() + 5))
        results: list = []
        deadline = time.monotonic() + 20
        while len(results) < 200 and time.monotonic() < deadline:
            results += client.drain_results()
            time.sleep(0.01)
        assert len(results) == 200 and not any(r.ok for r in results)
        assert held_ids(client, {f"r{i}" for i in range(200)}, "PrefillClient") == []
    finally:
        client.close()
