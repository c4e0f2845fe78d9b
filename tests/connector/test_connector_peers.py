"""P checks the D it writes into (connector/peer_links.py, connector/compat.py).

Real NIXL agents and CPU tensors: D listens on 127.0.0.2 (not the address P's loopback
defaults to), a different D answers at the address a target names, a D whose model description
differs, and a P whose per-layer hook missed a layer. The bytes of D are compared.
"""

from __future__ import annotations

import time

import pytest

from pdpush.connector.compat import PROTOCOL_VERSION, describe, mismatch

torch = pytest.importorskip("torch")
pytest.importorskip("nixl")

from pdpush.connector.config import PdpushConfig  # noqa: E402
from pdpush.connector.decode_worker import DecodeWorker  # noqa: E402
from pdpush.connector.metadata import DecodeStepMeta, PrefillStepMeta, PushTarget, PushTask  # noqa: E402
from pdpush.connector.prefill_worker import PrefillWorker  # noqa: E402
from pdpush.local.cluster import free_port  # noqa: E402

BLOCKS, BS, WIDTH, LAYERS = 8, 4, 8, ["l0", "l1", "l2"]
IDENTITY = {"model": "tiny", "dtype": "torch.float32", "kv_cache_dtype": "auto", "block_size": BS,
            "layers": 3, "kv_heads_per_rank": 2, "tp_size": 1}


def caches(fill: bool) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {name: (torch.randn(BLOCKS, 2, BS, WIDTH, generator=gen) if fill
                   else torch.zeros(BLOCKS, 2, BS, WIDTH)) for name in LAYERS}


class Side:
    def __init__(self, worker, kv) -> None:
        self.worker, self.kv = worker, kv
        worker.register_kv_caches(kv)

    def snapshot(self) -> dict:
        return {name: t.clone() for name, t in self.kv.items()}

    def unchanged(self, before: dict) -> bool:
        return all(torch.equal(before[n], self.kv[n]) for n in LAYERS)


def make_d(engine_id: str, host: str = "127.0.0.1", identity=IDENTITY) -> tuple[Side, int]:
    port = free_port()
    config = PdpushConfig(side_channel_host=host, side_channel_port=port)
    return Side(DecodeWorker(config, engine_id, 0, BLOCKS, instance_id="s1", identity=identity),
                caches(False)), port


@pytest.fixture
def p():
    side = Side(PrefillWorker(PdpushConfig(), "p-engine", 0, BLOCKS, identity=IDENTITY), caches(True))
    yield side
    side.worker.close()


def push(p: Side, d: Side, target: PushTarget, layers=LAYERS) -> tuple[set, set]:
    """One whole-prompt step on P (saving `layers`), then both sides poll until P is done."""
    req = target.d_req_id
    d.worker.bind(DecodeStepMeta(expect={req: list(target.d_block_ids)}, nonces={req: target.nonce}))
    p.worker.bind(PrefillStepMeta(tasks=[PushTask("p-" + req, target, [0, 1],
                                                  list(target.d_block_ids), last=True)]))
    for name in layers:
        p.worker.save_kv_layer(name, p.kv[name])
    p.worker.wait_for_save()
    done, failed, released = set(), set(), set()
    deadline = time.monotonic() + 10
    while "p-" + req not in released and time.monotonic() < deadline:
        released |= p.worker.transfer_results({"p-" + req}).sent
        got = d.worker.transfer_results(set())
        done, failed = done | got.received, failed | got.failed
    end = time.monotonic() + 0.3
    while time.monotonic() < end:
        got = d.worker.transfer_results(set())
        done, failed = done | got.received, failed | got.failed
    assert "p-" + req in released
    return done, failed


def target(req: str, host: str, port: int, engine="d-main", instance="s1") -> PushTarget:
    return PushTarget(req, engine, f"{host}:{port}", (2, 3), 0, BS, 30.0,
                      f"{req:0<32}", instance)


def test_push_to_a_d_on_another_address(p):
    d, port = make_d("d-main", host="127.0.0.2")
    try:
        assert push(p, d, target("r1", "127.0.0.2", port)) == ({"r1"}, set())
        assert all(torch.equal(d.kv[n][2], p.kv[n][0]) for n in LAYERS)
    finally:
        d.worker.close()


@pytest.mark.parametrize("engine, instance", [("d-main", "s1"), ("d-main", "earlier-start")])
def test_a_wrong_d_at_the_address_gets_no_byte(p, engine, instance):
    """Another D (or another start of the same engine id) answers where the target points."""
    d, port = make_d("d-other" if instance == "s1" else engine)
    try:
        before = d.snapshot()
        done, failed = push(p, d, target("r2", "127.0.0.1", port, engine, instance))
        assert d.unchanged(before) and done == set()  # not even told: it is not P's D
    finally:
        d.worker.close()


def test_a_d_with_another_model_description_is_refused_and_told(p):
    d, port = make_d("d-main", identity={**IDENTITY, "kv_cache_dtype": "fp8"})
    try:
        before = d.snapshot()
        done, failed = push(p, d, target("r3", "127.0.0.1", port))
        assert d.unchanged(before) and failed == {"r3"}  # D falls back at once
    finally:
        d.worker.close()


def test_ok_only_when_every_layer_of_every_block_was_written(p):
    d, port = make_d("d-main")
    try:
        t = target("r4", "127.0.0.1", port)
        deadline = time.monotonic() + 5  # connected first: the forward's own hooks post
        while p.worker.links.lookup(t).pending and time.monotonic() < deadline:
            d.worker.transfer_results(set())
        done, failed = push(p, d, t, layers=LAYERS[:-1])
        assert failed == {"r4"}
    finally:
        d.worker.close()


def test_mismatch_names_the_field():
    mine = describe(IDENTITY, authenticated=True)
    assert mismatch(mine, dict(mine)) == ""
    line = mismatch(mine, {**mine, "tp_size": 2})
    assert "tp_size" in line and "\n" not in line
    assert "protocol" in mismatch(mine, {**mine, "protocol": PROTOCOL_VERSION + 1})
    assert "authenticated" in mismatch(mine, describe(IDENTITY, authenticated=False))
