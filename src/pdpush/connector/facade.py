"""`PdpushConnector`: the vLLM v1 KV connector, loaded with `kv_connector_module_path`.

vLLM builds one instance per process and role: the scheduler's (engine core) and each
worker's. This class only forwards vLLM's hooks to the half that matches vLLM's `kv_role`
(kv_consumer = D, kv_producer = P) and side (connector/halves.py), translating vLLM's objects
into pdpush's own types through pdpush.vllm_api on the way.

    --kv-transfer-config '{"kv_connector": "PdpushConnector",
                           "kv_connector_module_path": "pdpush.connector.facade", ...}'
(see pdpush.connector.config for the builders and every option).
"""

from __future__ import annotations

from typing import Any

from pdpush import vllm_api as api
from pdpush.connector.config import PdpushConfig
from pdpush.connector.halves import (
    SchedulerHalf, WorkerHalf, make_scheduler_half, make_worker_half,
)


class PdpushConnector(api.ConnectorBase):
    sched: SchedulerHalf  # set on the scheduler's instance only
    worker: WorkerHalf  # set on the workers' instances only

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        setup = api.engine_setup(vllm_config, role, kv_cache_config)
        self.config = PdpushConfig.from_extra_config(setup.extra, setup.kv_role)
        self._notified: dict[str, int] = {}  # worker side: this step's Transfers.notified
        if setup.scheduler_side:
            self.config.check_served(setup.kv_role)
            self.sched = make_scheduler_half(setup, self.config)
        else:
            self.worker = make_worker_half(setup, self.config, api.tensor_parallel_rank())

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """P's save_kv_layer must run after each layer, which a full CUDA graph would skip; D
        has no per-layer work and keeps full graphs. vLLM passes only the extra config here."""
        return not PdpushConfig.is_decode_extra(extra_config)

    # -- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: Any) -> None:
        super().bind_connector_metadata(connector_metadata)
        self.worker.bind(connector_metadata.step)

    def handle_preemptions(self, kv_connector_metadata: Any) -> None:
        self.worker.handle_preemptions(kv_connector_metadata.step)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return  # D's KV arrives by WRITE from P; nothing to load here

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a request joins the batch only after all of its KV arrived

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        self.worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        self.worker.wait_for_save()

    def transfers(self, finished_req_ids: set[str]) -> api.Transfers:
        """Handed to vLLM in its version's form by api.ConnectorBase (get_transfer_results or
        get_finished + get_block_ids_with_load_errors)."""
        transfers = self.worker.transfer_results(finished_req_ids)
        self._notified = transfers.notified  # vLLM asks for the worker metadata next
        return transfers

    def build_connector_worker_meta(self) -> Any:
        """The step's P notifications (lease releases) and KV arrival times (TTFT breakdown),
        to the scheduler half."""
        notified, self._notified = self._notified, {}
        return api.worker_meta(notified, self.worker.take_arrivals())

    def get_kv_connector_stats(self) -> Any:
        """The worker's counter increments since the last step (the scheduler's /stats sums them)."""
        worker = getattr(self, "worker", None)
        return api.worker_counts(worker.take_counts()) if worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> Any:
        return api.counts_from_stats(data)

    def shutdown(self) -> None:
        for half in (getattr(self, "sched", None), getattr(self, "worker", None)):
            if half is not None:
                half.close()

    # -- scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.sched.get_num_new_matched_tokens(api.request_view(request), num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self.sched.update_state_after_alloc(api.request_view(request),
                                            api.first_group_block_ids(blocks), num_external_tokens)

    def bind_blocks(self, blocks: api.BlockAccess) -> None:
        """From vLLM's bind_gpu_block_pool (api.ConnectorBase)."""
        self.sched.bind_blocks(blocks)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        return api.StepMeta(self.sched.build_meta(api.step_view(scheduler_output)))

    def update_connector_output(self, connector_output: Any) -> None:
        self.sched.update_connector_output(api.from_connector_output(connector_output))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.sched.request_finished(api.request_view(request))

    def has_pending_push_work(self) -> bool:
        return self.sched.has_pending()
