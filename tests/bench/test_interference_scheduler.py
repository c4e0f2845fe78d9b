"""The interference experiment's D scheduler on vLLM's real Scheduler (no engine): requests that
arrive while the background batch runs still reach the connector (so their prefill and KV push
start), and once their KV is in they stay out of the batch until it drops below B.

The connector here is a stand-in for pdpush's (remote iff the prompt is long); the scheduler,
KV cache manager and request objects are vLLM's own.
"""

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402
from vllm.config import CacheConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorMetadata,
)
from vllm.sampling_params import SamplingParams  # noqa: E402
from vllm.v1.core.sched.scheduler import Scheduler  # noqa: E402
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec  # noqa: E402
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput  # noqa: E402
from vllm.v1.request import Request, RequestStatus  # noqa: E402
from vllm.v1.structured_output import StructuredOutputManager  # noqa: E402

from pdpush.bench.interference.scheduler import HoldScheduler  # noqa: E402
from pdpush.local.tinymodel import ensure_tiny_model  # noqa: E402

BLOCK = 16
asked: list[str] = []


class RemoteIfLong(KVConnectorBase_V1):
    """D's decision in miniature: prompts over 8 tokens are loaded remotely (asynchronously)."""

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        asked.append(request.request_id)
        if request.num_tokens > 8:
            return request.num_tokens - num_computed_tokens, True
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        pass

    def build_connector_meta(self, scheduler_output):
        return KVConnectorMetadata()

    def start_load_kv(self, forward_context, **kwargs):
        pass

    def wait_for_layer_load(self, layer_name):
        pass

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        pass

    def wait_for_save(self):
        pass


def make_scheduler(cls, hold: int = 2, gather_s: float = 0.0, **caps):
    caps = {"max_num_seqs": 8, "max_num_batched_tokens": 512, **caps}
    config = VllmConfig(
        model_config=ModelConfig(model=str(ensure_tiny_model()), max_model_len=512),
        scheduler_config=SchedulerConfig(**caps, max_model_len=512, is_encoder_decoder=False),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
        kv_transfer_config=KVTransferConfig(kv_connector="RemoteIfLong", kv_role="kv_consumer",
                                            kv_connector_module_path=__name__),
        additional_config={"pdpush_hold_running": hold, "pdpush_gather_s": gather_s},
    )  # fmt: skip
    config.cache_config.num_gpu_blocks = 200
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=2, head_size=64, dtype=torch.float32)
    kv = KVCacheConfig(num_blocks=200, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["l0"], spec)])
    asked.clear()
    return cls(config, kv, StructuredOutputManager(config), block_size=BLOCK)


def add(sched, req_id: str, prompt_len: int, max_tokens: int) -> None:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
    sched.add_request(Request(req_id, list(range(10, 10 + prompt_len)), params, None))


def step(sched, received: set[str] = frozenset()) -> list[str]:
    """One engine step with a fake model output; returns the ids in this step's batch."""
    out = sched.schedule()
    ids = list(out.num_scheduled_tokens)
    sched.update_from_output(out, ModelRunnerOutput(
        req_ids=ids, req_id_to_index={r: i for i, r in enumerate(ids)},
        sampled_token_ids=[[5] for _ in ids],
        kv_connector_output=KVConnectorOutput(finished_recving=set(received)) if received else None,
    ))  # fmt: skip
    return ids


def background_then_remote(sched) -> list[list[str]]:
    """Two background requests decode; R arrives, its KV lands, then the background is aborted."""
    add(sched, "bg0", 1, 50)
    add(sched, "bg1", 1, 50)
    batches = [step(sched)]
    add(sched, "R", 64, 3)
    batches.append(step(sched))
    batches.append(step(sched, received={"R"}))
    batches += [step(sched) for _ in range(4)]
    sched.finish_requests(["bg0", "bg1"], RequestStatus.FINISHED_ABORTED)
    batches.append(step(sched))
    return batches


def test_hold_scheduler_starts_the_remote_prefill_but_keeps_the_request_out_of_the_batch():
    batches = background_then_remote(make_scheduler(HoldScheduler))
    assert "R" in asked  # the connector was asked while the batch was full: do_prefill goes out
    assert all(b == ["bg0", "bg1"] for b in batches[:-1])  # R never joined while bg ran
    assert batches[-1] == ["R"]  # and runs once the batch drops below B


def test_control_vllms_scheduler_lets_the_request_join_once_its_kv_is_in():
    batches = background_then_remote(make_scheduler(Scheduler))
    assert "R" in asked
    assert ["bg0", "bg1", "R"] in batches[:-1]


@pytest.mark.parametrize("cap", ["max_num_seqs", "max_num_scheduled_tokens"])
def test_control_capping_the_batch_with_a_vllm_setting_never_asks_the_connector(cap):
    sched = make_scheduler(Scheduler, **{cap: 2})  # the design document capped max_num_scheduled_tokens
    add(sched, "bg0", 1, 50)
    add(sched, "bg1", 1, 50)
    add(sched, "R", 64, 3)
    batches = [step(sched) for _ in range(4)]
    assert "R" not in asked  # no do_prefill would ever go out: the waiting loop stops first
    assert all(b == ["bg0", "bg1"] for b in batches)


def test_the_background_batch_starts_together():
    sched = make_scheduler(HoldScheduler, hold=3, gather_s=60.0)
    add(sched, "bg0", 1, 50)
    assert [step(sched) for _ in range(3)] == [[], [], []]  # one of three: wait for the others
    add(sched, "bg1", 1, 50)
    add(sched, "bg2", 1, 50)
    assert step(sched) == ["bg0", "bg1", "bg2"]


def test_gathering_gives_up_after_gather_s():
    sched = make_scheduler(HoldScheduler, hold=3, gather_s=0.0)
    add(sched, "bg0", 1, 50)
    assert step(sched) == ["bg0"]


def test_hold_needs_a_batch_size_below_the_caps():
    with pytest.raises(ValueError, match="must be below max_num_seqs"):
        make_scheduler(HoldScheduler, hold=2, max_num_seqs=2)
