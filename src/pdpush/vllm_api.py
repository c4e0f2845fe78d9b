"""The one module that imports vLLM or knows the names of its objects and fields.

The rest of pdpush sees plain pdpush types: `RequestView` instead of vLLM's Request, `StepView`
instead of SchedulerOutput, `Transfers` instead of KVConnectorOutput / KVConnectorTransferResults,
`BlockAccess` instead of the block pool, and `parse_metrics` for the text of vLLM's /metrics.

Versions: 0.26 (the GPU machine's) and 0.32 (the CPU tests'). Each difference is handled here,
named with the version that introduced it (search for "vLLM 0.32" / "vLLM 0.26"):
- completions: 0.32 added `get_transfer_results` -> KVConnectorTransferResults (with
  `failed_recving`); 0.26 has `get_finished()` -> (sending, recving) only.
- failed receives: 0.32 reports them per request (`failed_recving`); 0.26 only per block
  (`get_block_ids_with_load_errors`): D's blocks that P was to fill, from `skip_tokens` on.
- block access: 0.32 added `bind_kv_cache_manager`; both have `bind_gpu_block_pool`, which is the
  one used (free/total blocks for /stats). P's block ids come from the SchedulerOutput in both.
- empty steps: 0.26 skips `wait_for_save` on steps without a forward (0.32 calls it every step);
  D's worker opens its probe step only for steps with a forward (connector/decode_worker.py).

vLLM itself is imported lazily (module `__getattr__` for `ConnectorBase` and `StepMeta`), so the
halves, the probe and the HTTP clients import this module without loading vLLM.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

SUPPORTED = ((0, 26), (0, 32))  # (major, minor) versions this module was written against


@functools.cache
def _vllm() -> SimpleNamespace:
    """vLLM's connector API, loaded once on first use."""
    import vllm
    from vllm.distributed.kv_transfer.kv_connector.v1 import base
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

    version = tuple(int(x) for x in vllm.__version__.split(".")[:2])
    if version not in SUPPORTED:
        raise ImportError(f"pdpush: vLLM {vllm.__version__} is not supported (written for "
                          f"{', '.join('%d.%d' % v for v in SUPPORTED)}); see pdpush/vllm_api.py")

    class StepMeta(base.KVConnectorMetadata):
        """vLLM's metadata type around pdpush's plain per-step metadata."""

        def __init__(self, step: Any) -> None:
            self.step = step

    class WorkerCounts(KVConnectorStats):
        """Counter increments from the workers (e.g. refused notifications), summed on the way
        to the scheduler, whose /stats exports them."""

        def reset(self) -> None:
            self.data = {}

        def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
            for name, value in other.data.items():
                self.data[name] = self.data.get(name, 0) + value
            return self

        def reduce(self) -> dict[str, int | float]:
            return dict(self.data)

        def is_empty(self) -> bool:
            return not any(self.data.values())

    class WorkerMeta(base.KVConnectorWorkerMetadata):
        """Worker → scheduler, once per step. `notified`: D requests whose P notification
        arrived, with how many ranks saw it (summed over ranks: what releases blocks held at the
        lease's end, connector/quarantine.py). `arrivals`: {req_id: (arrival, P's offsets)} of KV
        arrivals, ranks merged keeping the latest (the KV is in once every rank has it)."""

        def __init__(self, notified: dict[str, int], arrivals: dict[str, Any]) -> None:
            self.notified = notified
            self.arrivals = arrivals

        def aggregate(self, other: Any) -> Any:
            notified = dict(self.notified)
            for req_id, n in other.notified.items():
                notified[req_id] = notified.get(req_id, 0) + n
            arrivals = dict(self.arrivals)
            for req_id, arrival in other.arrivals.items():
                if req_id not in arrivals or arrival[0] > arrivals[req_id][0]:
                    arrivals[req_id] = arrival
            return WorkerMeta(notified, arrivals)

    # Pickled between the scheduler and worker processes: found again as pdpush.vllm_api.StepMeta
    # (module __getattr__ below), the same class object in every process.
    for cls in (StepMeta, WorkerMeta, WorkerCounts):
        cls.__qualname__ = cls.__name__
        cls.__module__ = __name__

    return SimpleNamespace(base=base, StepMeta=StepMeta, WorkerMeta=WorkerMeta,
                           WorkerCounts=WorkerCounts, ConnectorBase=connector_base(base))


def connector_base(base: Any) -> type:
    """vLLM's KVConnectorBase_V1 with this version's completion and block-pool hooks mapped onto
    two plain methods the connector implements: `transfers(finished_req_ids) -> Transfers`
    (workers) and `bind_blocks(BlockAccess)` (scheduler); vLLM's other hooks are the same in
    both versions and the connector implements them as they are."""

    class ConnectorBase(base.KVConnectorBase_V1):
        _load_errors: set[int] = set()

        def transfers(self, finished_req_ids: set[str]) -> Transfers:
            raise NotImplementedError

        def bind_blocks(self, blocks: BlockAccess) -> None:
            raise NotImplementedError

        def bind_gpu_block_pool(self, gpu_block_pool: Any) -> None:
            # In both versions (0.32's bind_kv_cache_manager calls it; 0.26 has only this one).
            self.bind_blocks(BlockAccess(gpu_block_pool))

        if hasattr(base, "KVConnectorTransferResults"):  # vLLM 0.32: request-level failures
            def get_transfer_results(self, finished_req_ids: set[str]) -> Any:
                t = self.transfers(finished_req_ids)
                return base.KVConnectorTransferResults(
                    finished_sending=t.sent, finished_recving=t.received, failed_recving=t.failed)
        else:  # vLLM 0.26: get_finished's pair, then the failed requests' blocks, same step
            def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                         set[str] | None]:
                t = self.transfers(finished_req_ids)
                self._load_errors = self._load_errors | t.failed_blocks
                return t.sent or None, t.received or None

            def get_block_ids_with_load_errors(self) -> set[int]:
                errors, self._load_errors = self._load_errors, set()
                return errors

    return ConnectorBase


def __getattr__(name: str) -> Any:
    if name == "ConnectorBase":
        return _vllm().ConnectorBase
    if name in ("StepMeta", "WorkerMeta", "WorkerCounts"):
        return getattr(_vllm(), name)
    raise AttributeError(name)


# -- engine set-up ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineSetup:
    """What a connector instance learns from vLLM when it is built."""

    kv_role: str  # "kv_consumer" (D) or "kv_producer" (P), as the user set it
    scheduler_side: bool  # the scheduler's instance (engine core), else a worker's
    engine_id: str
    block_size: int
    num_blocks: int
    extra: dict[str, Any]  # kv_connector_extra_config
    ranks: int = 1  # tensor-parallel workers: each reports P's notifications on its own
    instance_id: str = ""  # per start of the engine (the same in its scheduler and workers)
    # What P and D must agree on before P writes (connector/compat.py compares them).
    identity: dict[str, Any] = field(default_factory=dict)


def engine_setup(vllm_config: Any, role: Any, kv_cache_config: Any) -> EngineSetup:
    kv = vllm_config.kv_transfer_config
    return EngineSetup(kv.kv_role, role == _vllm().base.KVConnectorRole.SCHEDULER,
                       str(kv.engine_id), vllm_config.cache_config.block_size,
                       kv_cache_config.num_blocks, dict(kv.kv_connector_extra_config or {}),
                       vllm_config.parallel_config.tensor_parallel_size,
                       str(vllm_config.instance_id), engine_identity(vllm_config))


def engine_identity(vllm_config: Any) -> dict[str, Any]:
    """Model, dtypes and KV geometry per rank: a P may write into a D only if they are equal."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    served = model.served_model_name
    return {
        "model": served[0] if isinstance(served, list) else str(served or model.model),
        "architecture": model.architecture,
        "dtype": str(model.dtype),
        "kv_cache_dtype": str(vllm_config.cache_config.cache_dtype),
        "block_size": vllm_config.cache_config.block_size,
        "layers": model.get_num_layers(parallel),
        "kv_heads_per_rank": model.get_num_kv_heads(parallel),
        "tp_size": parallel.tensor_parallel_size,
    }


def tensor_parallel_rank() -> int:
    from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

    return get_tensor_model_parallel_rank()


# -- requests --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sampling:
    """The sampling fields P needs for its one token (their OpenAI names are the same)."""

    temperature: float = 0.0
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    # No option that reshapes the logits (penalties, logit bias, min_tokens, bad words, allowed
    # tokens, structured output, watermarking, extra_args for logits processors): P's greedy
    # token is then defined to equal D's. P is sent only the fields above.
    plain: bool = True


def _plain(sp: Any) -> bool:
    """vLLM 0.32 SamplingParams: no logits-shaping option set (see Sampling.plain)."""
    return (sp.presence_penalty == 0 and sp.frequency_penalty == 0 and sp.repetition_penalty == 1
            and not sp.min_tokens and not sp.logit_bias and not sp.allowed_token_ids
            and not sp.bad_words and sp.structured_outputs is None
            and not getattr(sp, "watermarking", None) and not sp.extra_args)


@dataclass
class RequestView:
    """The fields of vLLM's Request that pdpush reads, taken at the hook that reads them."""

    request_id: str
    num_prompt_tokens: int
    num_tokens: int  # prompt + output so far: more than the prompt after a preemption
    prompt_token_ids: Sequence[int]
    kv_transfer_params: dict[str, Any] | None
    output_token_ids: Sequence[int] = ()
    sampling: Sampling | None = None
    cache_salt: str | None = None
    # Inputs that the prompt's token ids do not carry, so P (sent token ids only) cannot
    # reproduce the KV: "lora", "multimodal", "prompt_embeds"; empty for a plain text prompt.
    beyond_tokens: tuple[str, ...] = ()


def request_view(request: Any) -> RequestView:
    sp = request.sampling_params
    sampling = None if sp is None else Sampling(sp.temperature, sp.top_p, sp.top_k, sp.seed,
                                                _plain(sp))
    beyond = tuple(name for name, present in (
        ("lora", request.lora_request is not None),
        ("multimodal", bool(request.mm_features)),
        ("prompt_embeds", request.prompt_embeds is not None)) if present)
    return RequestView(request.request_id, request.num_prompt_tokens, request.num_tokens,
                       request.prompt_token_ids, request.kv_transfer_params,
                       request.output_token_ids, sampling, request.cache_salt, beyond)


def first_group_block_ids(blocks: Any) -> list[int]:
    """D's block ids of one request from vLLM's KVCacheBlocks (one KV cache group)."""
    return list(blocks.get_block_ids()[0])


@dataclass(frozen=True)
class BlockAccess:
    """The scheduler's block pool (`bind_gpu_block_pool`, in both versions): free/total blocks
    (free counts evictable prefix-cache blocks, vLLM's own count), and the lease's quarantine."""

    pool: Any

    def free_blocks(self) -> int:
        return self.pool.get_num_free_blocks()

    def total_blocks(self) -> int:
        return self.pool.num_gpu_blocks

    def hold(self, block_ids: Sequence[int]) -> None:
        """Take one more reference on each block: vLLM freeing the request's blocks then leaves
        them out of the free pool until `release` (the lease's quarantine)."""
        self.pool.touch([self.pool.blocks[i] for i in block_ids])

    def release(self, block_ids: Sequence[int]) -> None:
        self.pool.free_blocks([self.pool.blocks[i] for i in block_ids])

    def evict(self, block_ids: Sequence[int]) -> None:
        """Take these blocks out of the prefix cache (their hashes), not out of their requests.

        BlockPool.evict_blocks in both versions (what KVCacheManager.evict_blocks calls, and what
        vLLM does itself for blocks that failed to load); a block without a hash is left alone, a
        block still in use keeps its data but no later request can match it.
        """
        self.pool.evict_blocks(set(block_ids))


# -- steps -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepView:
    """One scheduler step: per scheduled request (tokens computed before, tokens this step), and
    the block ids each request got this step (first KV cache group): appended to the request's
    list, or replacing it for the ids in `resumed` (a preempted request starts over)."""

    scheduled: dict[str, tuple[int, int]]
    total_tokens: int
    preempted: frozenset[str] = frozenset()
    new_blocks: dict[str, list[int]] = field(default_factory=dict)
    resumed: frozenset[str] = frozenset()


def step_view(scheduler_output: Any) -> StepView:
    """The same in both versions. P reads its block ids here rather than from the cache manager,
    which vLLM 0.26 does not hand to connectors (`bind_kv_cache_manager` is 0.32's)."""
    num_new = scheduler_output.num_scheduled_tokens
    new_reqs = scheduler_output.scheduled_new_reqs
    computed = {r.req_id: r.num_computed_tokens for r in new_reqs}
    blocks = {r.req_id: list(r.block_ids[0]) for r in new_reqs}
    cached = scheduler_output.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens))
    blocks.update((r, list(ids[0])) for r, ids in zip(cached.req_ids, cached.new_block_ids) if ids)
    scheduled = {req_id: (done, num_new.get(req_id, 0)) for req_id, done in computed.items()}
    return StepView(scheduled, int(scheduler_output.total_num_scheduled_tokens),
                    frozenset(scheduler_output.preempted_req_ids or ()), blocks,
                    frozenset(cached.resumed_req_ids or ()))


# -- transfer results ------------------------------------------------------------------------
@dataclass
class Transfers:
    """Requests whose transfers ended, as pdpush's halves report and receive them."""

    sent: set[str] = field(default_factory=set)  # P: WRITEs done and D notified
    received: set[str] = field(default_factory=set)  # D: KV in (failed ones included)
    failed: set[str] = field(default_factory=set)  # D: no usable KV: recompute or fail
    # D: requests whose P notification arrived (in time or after the give-up), per rank count:
    # what releases blocks held at the lease's end (connector/quarantine.py)
    notified: dict[str, int] = field(default_factory=dict)
    # D: the blocks P was to fill (from skip_tokens on) of the failed requests
    failed_blocks: set[int] = field(default_factory=set)
    # D: req_id -> (monotonic time D's worker saw P's notification, P's WRITE offsets in ms)
    arrivals: dict[str, tuple[float, tuple[float, ...]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # workers' counter increments


def worker_counts(counts: dict[str, int]) -> Any:
    """A worker's counter increments as vLLM's KVConnectorStats (None when nothing changed)."""
    return _vllm().WorkerCounts(data=dict(counts)) if any(counts.values()) else None


def counts_from_stats(data: dict[str, Any] | None) -> Any:
    """vLLM's stats logger rebuilds the connector's stats from their dict (build_kv_connector_stats)."""
    return _vllm().WorkerCounts(data=dict(data)) if data else None


def from_connector_output(output: Any) -> Transfers:
    """vLLM's KVConnectorOutput. Failures come back as `failed_recving` (vLLM 0.32) or only as
    `invalid_block_ids` (vLLM 0.26, where 0.32 also reports them for other connectors' loads).
    `kv_connector_worker_meta` (the workers' WorkerMeta, merged) is in both 0.26 and 0.32."""
    meta = getattr(output, "kv_connector_worker_meta", None)
    stats = getattr(output, "kv_connector_stats", None)
    return Transfers(set(output.finished_sending or ()), set(output.finished_recving or ()),
                     set(getattr(output, "failed_recving", None) or ()),
                     dict(getattr(meta, "notified", None) or {}),
                     set(output.invalid_block_ids or ()),
                     dict(getattr(meta, "arrivals", None) or {}),
                     dict(stats.data) if stats is not None else {})


def worker_meta(notified: dict[str, int], arrivals: dict[str, Any]) -> Any:
    """vLLM's KVConnectorWorkerMetadata carrying `Transfers.notified` and the step's arrivals;
    None when both are empty, so an idle step's output stays empty."""
    return _vllm().WorkerMeta(notified, arrivals) if notified or arrivals else None


# -- /metrics --------------------------------------------------------------------------------
WAITING_REQUESTS = "vllm:num_requests_waiting"
PROMPT_TOKENS_TOTAL = "vllm:prompt_tokens_total"


def metric_sum(text: str, name: str) -> float:
    """One sample's value summed over its label sets, by scanning only the lines that start with
    it. D reads P's queue this way at every health check: parse_metrics on vLLM's ~90 kB /metrics
    holds the GIL of D's scheduler process for ~30 ms (a step's worth), this for ~1 ms.
    ValueError for a matching line that is not Prometheus text."""
    total, start = 0.0, 0
    while (i := text.find(name, start)) >= 0:
        end = text.find("\n", i)
        end = len(text) if end < 0 else end
        start = end
        if i and text[i - 1] != "\n" or text[i + len(name):i + len(name) + 1] not in ("{", " "):
            continue  # inside another line, or a longer name
        line = text[i:end]
        rest = line[line.rindex("}") + 1:] if line[len(name)] == "{" else line[len(name):]
        total += float(rest.split()[0])
    return total


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text of a vLLM server: sample name -> value summed over its label sets."""
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
    return totals
