"""`PdpushConnector`: the vLLM v1 KV connector, loaded with `kv_connector_module_path`.

vLLM builds one instance per process and role: the scheduler's (engine core) and each
worker's. This class only routes vLLM's hooks to the half that matches (D = kv_consumer,
P = kv_producer; scheduler or worker), so each half stays small and readable.

    --kv-transfer-config '{"kv_connector": "PdpushConnector",
                           "kv_connector_module_path": "pdpush.connector.facade", ...}'
(see pdpush.connector.config for the builders and every option).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole, KVConnectorTransferResults,
)

from pdpush.connector.config import PdpushConfig
from pdpush.connector.metadata import DecodeStepMeta, PrefillStepMeta
from pdpush.connector.stats import serve_stats
from pdpush.rpc.json_server import JsonServer

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class PdpushMeta(KVConnectorMetadata):
    """vLLM's metadata type around pdpush's plain step metadata."""

    def __init__(self, step: DecodeStepMeta | PrefillStepMeta) -> None:
        self.step = step


class PdpushConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        kv = vllm_config.kv_transfer_config
        self.config = PdpushConfig.from_extra_config(kv.kv_connector_extra_config, kv.kv_role)
        self.is_decode = kv.kv_role == "kv_consumer"
        engine_id = str(kv.engine_id)
        block_size = vllm_config.cache_config.block_size
        self.sched: Any = None
        self.worker: Any = None
        self.probe: Any = None
        self.stats_server: JsonServer | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._init_scheduler(engine_id, block_size, kv.kv_connector_extra_config or {})
        else:
            self._init_worker(engine_id, kv_cache_config.num_blocks, kv.kv_connector_extra_config)

    def _init_scheduler(self, engine_id: str, block_size: int, extra: dict[str, Any]) -> None:
        if self.is_decode:
            from pdpush.connector.decode_scheduler import DecodeScheduler

            probe_on = any(k.startswith("probe") for k in extra)
            self.sched = DecodeScheduler(self.config, block_size, engine_id, probe_on)
        else:
            from pdpush.connector.prefill_scheduler import PrefillScheduler

            self.sched = PrefillScheduler(block_size)

    def _init_worker(self, engine_id: str, num_blocks: int, extra: dict[str, Any] | None) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        rank = get_tensor_model_parallel_rank()
        if self.is_decode:
            from pdpush.connector.decode_worker import DecodeWorker
            from pdpush.probe import StepProbe

            self.probe = StepProbe.from_config(extra or {}, rank)
            self.worker = DecodeWorker(self.config, engine_id, rank, num_blocks)
        else:
            from pdpush.connector.prefill_worker import PrefillWorker

            self.worker = PrefillWorker(self.config, engine_id, rank, num_blocks)

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        """P's save_kv_layer must run after each layer, which a full CUDA graph would skip.
        D (the role with prefill_urls) has no per-layer work and keeps full graphs."""
        return not (extra_config or {}).get("prefill_urls")

    # -- worker side -----------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.worker.register_kv_caches(kv_caches)

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Called before the forward (start_load_kv runs after it in vLLM 0.32)."""
        super().bind_connector_metadata(connector_metadata)
        assert isinstance(connector_metadata, PdpushMeta)
        if self.is_decode:
            if self.probe is not None:
                self.probe.step_begin()
            self.worker.start_load_kv(connector_metadata.step)
        else:
            self.worker.bind(connector_metadata.step)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        if not self.is_decode:
            assert isinstance(kv_connector_metadata, PdpushMeta)
            self.worker.finish_writes(kv_connector_metadata.step.preempted)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        return  # D's KV arrives by WRITE from P; nothing to load here

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # a request joins the batch only after all of its KV arrived

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any,
                      **kwargs: Any) -> None:
        if not self.is_decode:
            self.worker.save_kv_layer(layer_name, kv_layer)

    def wait_for_save(self) -> None:
        if not self.is_decode:
            self.worker.wait_for_save()
        elif self.probe is not None:
            meta = self._get_connector_metadata()
            assert isinstance(meta, PdpushMeta)
            self.probe.step_end(meta.step.batch_stats, self.worker.rx_bytes)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        if self.is_decode:
            done, failed = self.worker.transfer_results()
            return KVConnectorTransferResults(finished_recving=done, failed_recving=failed)
        return KVConnectorTransferResults(finished_sending=self.worker.get_finished(finished_req_ids))

    def shutdown(self) -> None:
        for part in (self.worker, self.sched, self.probe, self.stats_server):
            if part is not None:
                part.close()

    # -- scheduler side --------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        return self.sched.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: Any,
                                 num_external_tokens: int) -> None:
        if self.is_decode:
            self.sched.update_state_after_alloc(request, blocks, num_external_tokens)

    def bind_kv_cache_manager(self, kv_cache_manager: Any) -> None:
        super().bind_kv_cache_manager(kv_cache_manager)
        if not self.is_decode:
            self.sched.get_block_ids = lambda req_id: kv_cache_manager.get_block_ids(req_id)[0]
        if self.config.stats_port:
            pool = kv_cache_manager.block_pool
            self.stats_server = serve_stats(
                self.config.side_channel_host, self.config.stats_port,
                lambda: {"role": "D" if self.is_decode else "P",
                         "free_blocks": pool.get_num_free_blocks(),
                         "total_blocks": pool.num_gpu_blocks, **self.sched.stats()})

    def build_connector_meta(self, scheduler_output: Any) -> KVConnectorMetadata:
        return PdpushMeta(self.sched.build_meta(scheduler_output))

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        if self.is_decode:
            self.sched.update_connector_output(set(connector_output.finished_recving or ()),
                                               set(connector_output.failed_recving or ()))
        else:
            self.sched.update_connector_output(set(connector_output.finished_sending or ()))

    def request_finished(self, request: "Request",
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return self.sched.request_finished(request)

    def has_pending_push_work(self) -> bool:
        return self.sched is not None and not self.is_decode and self.sched.has_pending()
