"""The two interfaces the facade forwards vLLM's hooks to, one implementation per role.

Scheduler halves (engine core): decode_scheduler.DecodeScheduler, prefill_scheduler.PrefillScheduler.
Worker halves (one per GPU): decode_worker.DecodeWorker, prefill_worker.PrefillWorker.
Their arguments are pdpush's own types (pdpush.vllm_api), never vLLM's objects.
"""

from __future__ import annotations

from typing import Any, Protocol

from pdpush.connector.config import DECODE_ROLE, PdpushConfig
from pdpush.vllm_api import BlockAccess, EngineSetup, RequestView, StepView, Transfers


class SchedulerHalf(Protocol):
    def get_num_new_matched_tokens(self, request: RequestView,
                                   num_computed: int) -> tuple[int, bool]: ...

    def update_state_after_alloc(self, request: RequestView, block_ids: list[int],
                                 num_external: int) -> None: ...

    def bind_blocks(self, blocks: BlockAccess) -> None: ...

    def build_meta(self, step: StepView) -> Any: ...

    def update_connector_output(self, transfers: Transfers) -> None: ...

    def request_finished(self, request: RequestView) -> tuple[bool, dict[str, Any] | None]: ...

    def has_pending(self) -> bool: ...

    def stats(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


class WorkerHalf(Protocol):
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None: ...

    # meta: the step metadata of the worker's own role (metadata.DecodeStepMeta / PrefillStepMeta)
    def bind(self, meta: Any) -> None: ...

    def handle_preemptions(self, meta: Any) -> None: ...

    def save_kv_layer(self, layer_name: str, kv_layer: Any) -> None: ...

    def wait_for_save(self) -> None: ...

    def transfer_results(self, finished_req_ids: set[str]) -> Transfers: ...

    # D: {req_id: (monotonic arrival of P's notification, P's WRITE offsets)} since the last call
    def take_arrivals(self) -> dict[str, tuple[float, tuple[float, ...]]]: ...
    # Counter increments since the last call, summed into the scheduler's /stats.
    def take_counts(self) -> dict[str, int]: ...

    def close(self) -> None: ...


def make_scheduler_half(setup: EngineSetup, config: PdpushConfig) -> SchedulerHalf:
    if setup.kv_role == DECODE_ROLE:
        from pdpush.connector.decode_scheduler import DecodeScheduler

        return DecodeScheduler(config, setup.block_size, setup.engine_id, ranks=setup.ranks,
                               instance_id=setup.instance_id)
    from pdpush.connector.prefill_scheduler import PrefillScheduler

    return PrefillScheduler(setup.block_size, config)


def make_worker_half(setup: EngineSetup, config: PdpushConfig, rank: int) -> WorkerHalf:
    if setup.kv_role == DECODE_ROLE:
        from pdpush.connector.decode_worker import DecodeWorker

        return DecodeWorker(config, setup.engine_id, rank, setup.num_blocks,
                            instance_id=setup.instance_id, identity=setup.identity)
    from pdpush.connector.prefill_worker import PrefillWorker

    return PrefillWorker(config, setup.engine_id, rank, setup.num_blocks, identity=setup.identity)
