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
