"""One side of test_connector_netns.py, run inside a network namespace: `python netns_peer.py
d|p HOST PORT`. D serves its side channel on HOST:PORT and prints, as JSON, whether the request
arrived and whether its blocks hold P's bytes; P pushes one request into the D at HOST:PORT.
"""

from __future__ import annotations

import json
import sys
import time

import torch

from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_worker import DecodeWorker
from pdpush.connector.metadata import DecodeStepMeta, PrefillStepMeta, PushTarget, PushTask
from pdpush.connector.prefill_worker import PrefillWorker

BLOCKS, BS, WIDTH, LAYERS = 8, 4, 8, ["l0", "l1"]
REQ, NONCE, P_BLOCKS, D_BLOCKS = "r-netns", "n" * 32, [0, 1], [5, 6]


def p_caches() -> dict:
    gen = torch.Generator().manual_seed(7)
    return {name: torch.randn(BLOCKS, 2, BS, WIDTH, generator=gen) for name in LAYERS}


def run_d(host: str, port: int) -> dict:
    d = DecodeWorker(PdpushConfig(side_channel_host=host, side_channel_port=port), "d-ns", 0, BLOCKS)
    kv = {name: torch.zeros(BLOCKS, 2, BS, WIDTH) for name in LAYERS}
    d.register_kv_caches(kv)
    print("ready", flush=True)
    d.bind(DecodeStepMeta(expect={REQ: D_BLOCKS}, nonces={REQ: NONCE}))
    done, failed = set(), set()
    deadline = time.monotonic() + 30
    while REQ not in done and time.monotonic() < deadline:
        got = d.transfer_results(set())
        done, failed = done | got.received, failed | got.failed
        time.sleep(0.001)
    expected = p_caches()
    same = all(torch.equal(kv[n][d_b], expected[n][p_b])
               for n in LAYERS for p_b, d_b in zip(P_BLOCKS, D_BLOCKS))
    d.close()
    return {"received": REQ in done, "failed": REQ in failed, "bytes_equal": same}


def run_p(host: str, port: int) -> dict:
    p = PrefillWorker(PdpushConfig(), "p-ns", 0, BLOCKS)
    kv = p_caches()
    p.register_kv_caches(kv)
    target = PushTarget(REQ, "d-ns", f"{host}:{port}", tuple(D_BLOCKS), 0, BS, 30.0,
                        NONCE)
    p.bind(PrefillStepMeta(tasks=[PushTask("p-" + REQ, target, P_BLOCKS, D_BLOCKS, last=True)]))
    for name in LAYERS:
        p.save_kv_layer(name, kv[name])
    p.wait_for_save()
    released = set()
    deadline = time.monotonic() + 30
    while not released and time.monotonic() < deadline:
        released = p.transfer_results({"p-" + REQ}).sent
        time.sleep(0.001)
    p.close()
    return {"released": bool(released)}


if __name__ == "__main__":
    role, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    print(json.dumps((run_d if role == "d" else run_p)(host, port)), flush=True)
