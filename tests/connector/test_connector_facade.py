"""The facade's class-level answers to vLLM (imports vLLM, unlike the other unit tests)."""

import pytest

from pdpush.connector.config import decode_kv_config, prefill_kv_config


def test_only_p_asks_vllm_for_piecewise_cuda_graphs():
    facade = pytest.importorskip("pdpush.connector.facade")
    cls = facade.PdpushConnector
    assert cls.requires_piecewise_for_cudagraph(prefill_kv_config()["kv_connector_extra_config"])
    d_extra = decode_kv_config(["http://p"])["kv_connector_extra_config"]
    assert not cls.requires_piecewise_for_cudagraph(d_extra)


def test_step_metadata_survives_the_trip_to_the_workers():
    """vLLM pickles the connector metadata from the scheduler process to the workers."""
    import pickle

    api = pytest.importorskip("pdpush.vllm_api")
    from pdpush.connector.metadata import DecodeStepMeta

    meta = pickle.loads(pickle.dumps(api.StepMeta(DecodeStepMeta(expect={"a": [3]}, give_up=["b"]))))
    assert isinstance(meta, api.StepMeta) and meta.step == DecodeStepMeta({"a": [3]}, ["b"])


def test_worker_counts_reach_the_scheduler_summed():
    """D's workers count refused notifications; vLLM carries them to the scheduler (pickled,
    summed over the ranks), whose /stats exports them."""
    import pickle
    from types import SimpleNamespace as NS

    api = pytest.importorskip("pdpush.vllm_api")
    assert api.worker_counts({"notifs_refused": 0}) is None  # nothing new: nothing sent
    rank0, rank1 = (pickle.loads(pickle.dumps(api.worker_counts({"notifs_refused": n})))
                    for n in (2, 3))
    total = rank0.aggregate(rank1)
    output = NS(finished_sending=None, finished_recving=None, failed_recving=None,
                invalid_block_ids=set(), kv_connector_stats=total)
    assert api.from_connector_output(output).counts == {"notifs_refused": 5}
