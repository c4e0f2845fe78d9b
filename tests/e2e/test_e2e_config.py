"""A bad pdpush config stops the engine at start with one clear line (real vLLM server)."""

from __future__ import annotations

import pytest
from e2e_helpers import LOG_DIR

from pdpush.local.cluster import ServerError, VllmServer, free_port
from pdpush.connector.config import CONNECTOR_NAME, MODULE_PATH

pytestmark = pytest.mark.e2e


def test_bad_extra_config_fails_start_with_the_key_named(tiny_model):
    config = {"kv_connector": CONNECTOR_NAME, "kv_connector_module_path": MODULE_PATH,
              "kv_role": "kv_consumer",
              "kv_connector_extra_config": {"prefill_urls": [f"http://127.0.0.1:{free_port()}"],
                                            "remote_treshold_tokens": 64}}
    server = VllmServer("bad-config", tiny_model, kv_transfer_config=config, cpu_core=0,
                        log_dir=LOG_DIR)
    with pytest.raises(ServerError):
        with server:
            pass
    log = server.log_path.read_text(errors="replace")
    assert "pdpush: unknown kv_connector_extra_config key(s) ['remote_treshold_tokens']" in log
