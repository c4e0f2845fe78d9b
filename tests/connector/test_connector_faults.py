"""The fault seam (connector/faults.py): off unless allowed, one-shot triggers, block and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import pdpush

from pdpush.connector.config import ConfigError, PdpushConfig, prefill_kv_config
from pdpush.connector.faults import FAULT_HOOKS_ENV, FaultHooks

SRC = os.path.dirname(os.path.dirname(pdpush.__file__))  # this tree's src, for the child


def test_seam_is_off_and_refused_without_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_HOOKS_ENV, raising=False)
    assert FaultHooks.from_dir(str(tmp_path)) is None
    with pytest.raises(ConfigError, match="fault_hooks_dir is a test seam"):
        prefill_kv_config(fault_hooks_dir=str(tmp_path))
    assert FaultHooks.from_dir("") is None


def test_seam_is_accepted_for_tests(tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_HOOKS_ENV, "1")
    config = PdpushConfig.from_extra_config({"fault_hooks_dir": str(tmp_path)}, "kv_producer")
    assert FaultHooks.from_dir(config.fault_hooks_dir) is not None


def test_unarmed_point_does_nothing(tmp_path):
    hooks = FaultHooks(str(tmp_path))
    start = time.monotonic()
    hooks.at("accepted")
    assert time.monotonic() - start < 0.5 and not hooks.hit("accepted").exists()


def test_block_holds_one_caller_until_released(tmp_path):
    hooks = FaultHooks(str(tmp_path))
    hooks.arm("between_layers")
    passed = []
    first = threading.Thread(target=lambda: (hooks.at("between_layers"), passed.append(1)))
    first.start()
    assert hooks.wait_hit("between_layers", timeout_s=5) == os.getpid()
    hooks.at("between_layers")  # the trigger was taken: a second caller goes on
    time.sleep(0.1)
    assert passed == [] and first.is_alive()
    hooks.release("between_layers")
    first.join(timeout=5)
    assert passed == [1]


def test_unknown_point_or_action_is_refused(tmp_path):
    with pytest.raises(ValueError):
        FaultHooks(str(tmp_path)).arm("nowhere")
    with pytest.raises(ValueError):
        FaultHooks(str(tmp_path)).arm("accepted", "explode")


def test_stop_sends_the_process_sigstop_until_sigcont(tmp_path):
    hooks = FaultHooks(str(tmp_path))
    hooks.arm("after_notify", "stop")
    code = ("import sys; from pdpush.connector.faults import FaultHooks; "
            "FaultHooks(sys.argv[1]).at('after_notify'); print('resumed')")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                             text=True, env={**os.environ, "PYTHONPATH": SRC})
    try:
        pid = hooks.wait_hit("after_notify", timeout_s=20)
        assert pid == child.pid
        end = time.monotonic() + 5
        while _state(pid) != "T" and time.monotonic() < end:
            time.sleep(0.01)
        assert _state(pid) == "T"  # stopped, not merely slow
        os.kill(pid, signal.SIGCONT)
        assert child.communicate(timeout=20)[0].strip() == "resumed"
    finally:
        child.kill()
        child.wait()


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]
