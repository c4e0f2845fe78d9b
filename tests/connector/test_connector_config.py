"""Config: the kv-transfer-config builders and clear errors on bad values (no vLLM)."""

import pytest

from pdpush.connector.config import (
    ConfigError, PdpushConfig, decode_kv_config, prefill_kv_config,
)


def test_decode_config_is_complete_and_valid():
    cfg = decode_kv_config(["http://127.0.0.1:8100/"], remote_threshold_tokens=32)
    assert cfg["kv_role"] == "kv_consumer"
    assert cfg["kv_connector_module_path"] == "pdpush.connector.facade"
    assert cfg["kv_load_failure_policy"] == "recompute"
    parsed = PdpushConfig.from_extra_config(cfg["kv_connector_extra_config"], "kv_consumer")
    assert parsed.prefill_urls == ("http://127.0.0.1:8100",)
    assert parsed.remote_threshold_tokens == 32


def test_on_failure_error_makes_vllm_fail_the_request():
    cfg = decode_kv_config(["http://p"], on_failure="error")
    assert cfg["kv_load_failure_policy"] == "fail"


def test_prefill_config_needs_no_urls():
    assert prefill_kv_config()["kv_role"] == "kv_producer"


def test_probe_keys_pass_through():
    parsed = PdpushConfig.from_extra_config({"probe_log": "x.jsonl"}, "kv_producer")
    assert parsed.probe.log == "x.jsonl"


@pytest.mark.parametrize("extra, message", [
    ({"remote_threshold": 5}, "unknown kv_connector_extra_config key(s) ['remote_threshold']"),
    ({"remote_threshold_tokens": "5"}, "remote_threshold_tokens must be an integer"),
    ({"remote_threshold_tokens": 0}, "remote_threshold_tokens must be >= 1"),
    ({"prefill_timeout_s": -1}, "prefill_timeout_s must be > 0"),
    ({"prefill_timeout_s": True}, "prefill_timeout_s must be a number"),
    ({"on_failure": "retry"}, "on_failure must be one of"),
    ({"prefill_urls": ["p:8000"]}, "must be http(s) URLs"),
    ({"prefill_urls": [1]}, "prefill_urls must be a list of strings"),
    ({"side_channel_port": 70000}, "side_channel_port out of range"),
    ({"prefill_urls": []}, "needs at least one entry in prefill_urls"),
])
def test_bad_decode_config_is_rejected_with_the_key_named(extra, message):
    with pytest.raises(ConfigError, match=None) as err:
        PdpushConfig.from_extra_config({"prefill_urls": ["http://p"], **extra}, "kv_consumer")
    assert message in str(err.value)


def test_bad_role_is_rejected():
    with pytest.raises(ConfigError, match="kv_role must be"):
        PdpushConfig.from_extra_config({}, "kv_both")


def test_builder_fails_early_on_a_typo():
    with pytest.raises(ConfigError, match="unknown"):
        decode_kv_config(["http://p"], threshold=3)



def test_probe_section_nested_or_flat_parses_the_same():
    flat = PdpushConfig.from_extra_config({"probe_log": "x", "probe_metrics": "h:9"}, "kv_producer")
    nested = PdpushConfig.from_extra_config({"probe": {"log": "x", "metrics": "h:9"}}, "kv_producer")
    assert flat.probe == nested.probe and nested.probe.metrics == ("h", 9)
    with pytest.raises(ConfigError, match="not both"):
        PdpushConfig.from_extra_config({"probe": {"log": "x"}, "probe_rx": "engine"}, "kv_producer")
    with pytest.raises(ConfigError, match=r"probe\.rx must be one of"):
        PdpushConfig.from_extra_config({"probe": {"rx": "wifi"}}, "kv_producer")


def test_prefill_urls_belong_to_d_only():
    """vLLM tells requires_piecewise_for_cudagraph only the extra config: prefill_urls mark D."""
    with pytest.raises(ConfigError, match="prefill_urls is D's setting"):
        PdpushConfig.from_extra_config({"prefill_urls": ["http://p"]}, "kv_producer")


@pytest.mark.parametrize("extra", [{"debug_skip_layer_event": True}, {"debug_delay_layer_us": 500}])
def test_debug_settings_are_refused_unless_a_test_asks(extra, monkeypatch):
    """A served config must not be able to switch off the ordering rule by a typo'd copy-paste."""
    monkeypatch.delenv("PDPUSH_TEST_MODE", raising=False)
    with pytest.raises(ConfigError, match=f"{next(iter(extra))}: test-only setting") as err:
        prefill_kv_config(**extra)
    assert "PDPUSH_TEST_MODE=1" in str(err.value)
    monkeypatch.setenv("PDPUSH_TEST_MODE", "0")
    with pytest.raises(ConfigError, match="test-only"):
        PdpushConfig.from_extra_config(extra, "kv_producer")
    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    parsed = PdpushConfig.from_extra_config(extra, "kv_producer")
    assert all(getattr(parsed, key) == value for key, value in extra.items())


def test_debug_settings_off_need_no_test_mode_and_are_typed(monkeypatch):
    monkeypatch.delenv("PDPUSH_TEST_MODE", raising=False)
    parsed = PdpushConfig.from_extra_config({"debug_skip_layer_event": False,
                                             "debug_delay_layer_us": 0}, "kv_producer")
    assert not parsed.debug_skip_layer_event and parsed.debug_delay_layer_us == 0
    with pytest.raises(ConfigError, match="debug_skip_layer_event must be true or false"):
        PdpushConfig.from_extra_config({"debug_skip_layer_event": 1}, "kv_producer")
    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    with pytest.raises(ConfigError, match="debug_delay_layer_us must be >= 0"):
        PdpushConfig.from_extra_config({"debug_delay_layer_us": -5}, "kv_producer")
