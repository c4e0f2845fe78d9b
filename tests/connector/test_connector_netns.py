"""P and D on two hosts, as far as the network sees it: two network namespaces joined by a veth
pair (needs root and `ip netns`; skipped otherwise). P's loopback has no D on it, so a push
lands only if P reaches D at the address D's target names (real NIXL over TCP, CPU tensors).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("nixl")

HERE = Path(__file__).parent
D_ADDR, P_ADDR, PORT = "10.213.0.1", "10.213.0.2", 5611


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def namespaces():
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 for network namespaces")
    tag = str(os.getpid())
    d_ns, p_ns = f"pdpush-d-{tag}", f"pdpush-p-{tag}"
    try:
        ip("netns", "add", d_ns)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot create a network namespace here: {exc.stderr.decode().strip()}")
    try:
        ip("netns", "add", p_ns)
        ip("link", "add", f"vd{tag}", "type", "veth", "peer", "name", f"vp{tag}")
        for ns, dev, addr in ((d_ns, f"vd{tag}", D_ADDR), (p_ns, f"vp{tag}", P_ADDR)):
            ip("link", "set", dev, "netns", ns)
            ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield d_ns, p_ns
    finally:
        for ns in (d_ns, p_ns):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def in_ns(ns: str, role: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(["src", os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen(["ip", "netns", "exec", ns, sys.executable, str(HERE / "netns_peer.py"),
                             role, D_ADDR, str(PORT)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def test_push_between_two_network_namespaces(namespaces):
    d_ns, p_ns = namespaces
    d = in_ns(d_ns, "d")
    try:
        for line in d.stdout:  # NIXL logs to stdout too
            if line.strip() == "ready":
                break
        else:
            pytest.fail(d.stderr.read())
        p = in_ns(p_ns, "p")
        p_out, p_err = p.communicate(timeout=60)
        d_out, d_err = d.communicate(timeout=60)
    finally:
        d.kill()
    assert json.loads(p_out.splitlines()[-1]) == {"released": True}, p_err
    result = json.loads(d_out.splitlines()[-1])
    assert result == {"received": True, "failed": False, "bytes_equal": True}, (d_err, p_err)
