"""Only D directs P's writes, and only the chosen P settles a request on D (connector/auth.py).

Forged push targets go through P's real scheduler half and worker half into a D worker, with
real NIXL agents and CPU tensors: D's bytes are compared before and after, not only counted.
Forged notifications come from a third NIXL agent that fetched D's metadata like a P would.
"""

from __future__ import annotations

import base64
import time
from types import SimpleNamespace as NS

import pytest

from pdpush.connector.auth import (
    CLOCK_DRIFT, Keys, NonceMemory, ReplayGuard, load_keys, write_key_file,
)
from pdpush.connector.config import ConfigError, PdpushConfig
from pdpush.connector.metadata import Forbidden, Notif, PushTarget
from pdpush.connector.prefill_scheduler import PrefillScheduler
from pdpush.vllm_api import RequestView, step_view

torch = pytest.importorskip("torch")
pytest.importorskip("nixl")

from pdpush.connector.decode_worker import DecodeWorker  # noqa: E402
from pdpush.connector.metadata import DecodeStepMeta  # noqa: E402
from pdpush.connector.prefill_worker import PrefillWorker  # noqa: E402
from pdpush.local.cluster import free_port  # noqa: E402
from pdpush.rpc.json_server import get_json  # noqa: E402
from pdpush.transfer.engine import TransferEngine  # noqa: E402

BLOCKS, BS, WIDTH, LAYERS = 12, 4, 8, ["l0", "l1", "l2"]
KEY, OTHER_KEY = "k" * 32, "o" * 32


# -- keys and signatures, no NIXL -----------------------------------------------------------
def signed_target(keys: Keys | None, req="r1", blocks=(1, 2), side_channel="127.0.0.1:1",
                  nonce="n" * 32, budget_s=30.0, **fields) -> dict:
    t = PushTarget(req, "d-engine", side_channel, tuple(blocks), 0, BS, budget_s, nonce,
                   "start-1", **fields)
    return t.to_params(keys)


def test_a_signed_target_verifies_and_forged_ones_do_not():
    keys = Keys(KEY.encode())
    assert PushTarget.from_params(signed_target(keys), keys).d_block_ids == (1, 2)
    with pytest.raises(Forbidden, match="not signed"):
        PushTarget.from_params(signed_target(None), keys)
    with pytest.raises(Forbidden, match="does not verify"):
        PushTarget.from_params(signed_target(Keys(OTHER_KEY.encode())), keys)
    for field, value in [("d_block_ids", [1, 3]), ("deadline", time.time() + 999),
                         ("side_channel", "10.0.0.9:1"), ("nonce", "m" * 32),
                         ("added_by_someone", 1)]:
        params = signed_target(keys)
        params["pdpush"][field] = value
        with pytest.raises(Forbidden):
            PushTarget.from_params(params, keys)


def test_rotation_accepts_current_and_previous_only(tmp_path, monkeypatch):
    old, new = Keys(OTHER_KEY.encode()), Keys(KEY.encode())
    path = tmp_path / "key"
    path.write_text(f"{KEY}\n{OTHER_KEY}\n")
    rotating = load_keys(str(path), "")
    for signer in (old, new):  # a D not restarted yet, and one that already was
        assert PushTarget.from_params(signed_target(signer), rotating) is not None
    assert rotating.sign({"a": 1}) == new.sign({"a": 1})  # signs with the current key
    with pytest.raises(Forbidden):  # once the old key is gone, its signatures are refused
        PushTarget.from_params(signed_target(old), new)
    monkeypatch.setenv("PDPUSH_TEST_KEY", KEY)
    assert load_keys("", "PDPUSH_TEST_KEY") == new


@pytest.mark.parametrize("opts, message", [
    ({"auth_key_file": "/nonexistent/key"}, "cannot read auth_key_file"),
    ({"auth_key_env": "PDPUSH_SURELY_UNSET"}, "PDPUSH_SURELY_UNSET, which is not set"),
    ({"auth_key_file": "KEYFILE", "auth_key_env": "X"}, "not both"),
    ({"auth_key_file": "SHORT"}, "shorter than"),
    ({"auth_key_file": "THREE"}, "one per line"),
])
def test_bad_key_config_stops_the_engine_with_one_line(tmp_path, opts, message):
    files = {"KEYFILE": KEY, "SHORT": "abc", "THREE": f"{KEY}\n{KEY}\n{KEY}"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    opts = {k: str(tmp_path / v) if v in files else v for k, v in opts.items()}
    with pytest.raises(ConfigError, match=message) as err:
        PdpushConfig.from_extra_config(opts, "kv_producer")
    assert KEY not in str(err.value) and "\n" not in str(err.value)


def test_generated_key_file_is_private(tmp_path):
    path = write_key_file(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_keys(str(path), "") is not None


def test_a_remote_p_without_a_key_refuses_to_start_d(tmp_path):
    remote = PdpushConfig(prefill_urls=("http://192.0.2.7:8000",))  # TEST-NET: never this host
    with pytest.raises(ConfigError, match="192.0.2.7.*auth_key_file or auth_key_env"):
        remote.check_served("kv_consumer")
    local = PdpushConfig(prefill_urls=("http://127.0.0.1:8000", "http://localhost:8001"))
    local.check_served("kv_consumer")  # same host: allowed without a key
    path = write_key_file(tmp_path)
    keyed = PdpushConfig(prefill_urls=remote.prefill_urls, auth_key_file=str(path))
    with pytest.raises(ConfigError, match="loopback address: set advertise_host"):
        keyed.check_served("kv_consumer")
    PdpushConfig(prefill_urls=remote.prefill_urls, auth_key_file=str(path),
                 advertise_host="192.0.2.1").check_served("kv_consumer")


def test_nonce_memory_refuses_replays_not_repeats():
    memory = NonceMemory(max_entries=3)
    assert memory.admit("n1", "req-a", expires=10.0, now=0.0)
    assert memory.admit("n1", "req-a", expires=10.0, now=1.0)  # vLLM asked again: not a replay
    assert not memory.admit("n1", "req-b", expires=10.0, now=1.0)
    for i in range(5):
        memory.admit(f"m{i}", "x", expires=10.0, now=2.0)
    assert len(memory) == 3  # bounded
    assert memory.admit("n9", "y", expires=20.0, now=11.0) and len(memory) == 1  # expired ones go


def test_replay_guard_refuses_a_target_older_than_its_budget_after_the_nonce_is_forgotten():
    """A target admitted at P's t=0 (D's clock 5000), replayed at t=700 once the nonce memory
    forgot it: the nonce memory alone takes it again (the control), the guard does not, while a
    fresh target of the same D start, and one of another D start, pass."""
    nonces = NonceMemory()
    guard = ReplayGuard()
    assert nonces.admit("n1", "a", expires=600.0, now=0.0)
    assert guard.refusal("n1", "a", "d/start-1", 5000.0, 30.0, 600.0, now=0.0) == ""
    assert guard.refusal("n2", "b", "d/start-1", 5699.9, 30.0, 600.0, now=700.0) == ""
    assert guard.refusal("n3", "c", "d/start-2", 12.0, 30.0, 600.0, now=700.0) == ""
    assert nonces.admit("n1", "z", expires=1300.0, now=700.0)  # forgotten: taken again
    assert "699.9 s ago" in guard.refusal("n1", "z", "d/start-1", 5000.0, 30.0, 600.0, now=700.0)
    assert "no issue time" in guard.refusal("n4", "d", "d/start-1", 0.0, 30.0, 600.0, now=700.0)
    # queued 20 s of a 30 s budget is no replay; the nonce is still refused a second time
    assert guard.refusal("n5", "e", "d/start-1", 5680.0, 30.0, 600.0, now=700.0) == ""
    assert "already used" in guard.refusal("n5", "f", "d/start-1", 5680.0, 30.0, 600.0, now=700.0)


@pytest.mark.parametrize("drift", [CLOCK_DRIFT, 0.0], ids=["guard", "control-fixed-reference"])
def test_replay_guard_takes_a_month_of_targets_from_a_d_whose_clock_runs_slow(drift, monkeypatch):
    """P's clock gains 200 ppm on D's (a free-running crystal can): with a fixed reference
    offset a D up for a month would see its targets refused as too old (the control)."""
    monkeypatch.setattr("pdpush.connector.auth.CLOCK_DRIFT", drift)
    guard = ReplayGuard()
    refused = 0
    for hour in range(0, 24 * 30, 6):
        p_now = hour * 3600.0
        d_clock = 1000.0 + p_now / (1 + 200e-6)
        refused += bool(guard.refusal(f"n{hour}", f"r{hour}", "d/s", d_clock, 30.0, 600.0, p_now))
    assert refused == (0 if drift else 113)  # every target after 42 hours (30 s / 200 ppm)


# -- through P's scheduler and workers into D's bytes ------------------------------------------
def caches(fill: bool) -> dict:
    gen = torch.Generator().manual_seed(2)
    return {name: (torch.randn(BLOCKS, 2, BS, WIDTH, generator=gen) if fill
                   else torch.zeros(BLOCKS, 2, BS, WIDTH)) for name in LAYERS}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    port = free_port()
    config = PdpushConfig(side_channel_port=port, auth_key_file=str(key_file))
    d = DecodeWorker(config, "d-engine", rank=0, num_blocks=BLOCKS, instance_id="start-1")
    p = PrefillWorker(config, "p-engine", rank=0, num_blocks=BLOCKS)
    d_kv, p_kv = caches(False), caches(True)
    d.register_kv_caches(d_kv)
    p.register_kv_caches(p_kv)
    yield NS(d=d, p=p, d_kv=d_kv, p_kv=p_kv, port=port, config=config, keys=config.keys())
    p.close()
    d.close()


def push_through_p(env, sched: PrefillScheduler, p_req: str, params: dict, tokens: int) -> set:
    """P's scheduler reads the request; every task it plans runs through P's worker. Returns
    the requests D reported received meanwhile."""
    sched.get_num_new_matched_tokens(RequestView(p_req, tokens, tokens, [], params), 0)
    meta = sched.build_meta(step_view(NS(
        scheduled_new_reqs=[NS(req_id=p_req, num_computed_tokens=0, block_ids=([0, 1, 2],))],
        scheduled_cached_reqs=NS(req_ids=[], num_computed_tokens=[], new_block_ids=[],
                                 resumed_req_ids=set()),
        num_scheduled_tokens={p_req: tokens}, total_num_scheduled_tokens=tokens,
        preempted_req_ids=set())))
    env.p.bind(meta)
    for name in LAYERS:
        env.p.save_kv_layer(name, env.p_kv[name])
    env.p.wait_for_save()
    deadline, done = time.monotonic() + 5, set()
    while time.monotonic() < deadline and env.p._out:  # WRITEs land while both sides poll
        env.p.transfer_results({p_req})
        done |= env.d.transfer_results(set()).received
    return done | received(env)[0]


def d_bytes(env) -> dict:
    return {name: env.d_kv[name].clone() for name in LAYERS}


def same_bytes(a: dict, b: dict) -> bool:
    return all(torch.equal(a[name], b[name]) for name in LAYERS)


def target_params(env, keys, req: str, blocks, nonce: str) -> dict:
    return signed_target(keys, req, blocks, f"127.0.0.1:{env.port}", nonce)


@pytest.mark.parametrize("forgery", ["unsigned", "wrong key", "tampered blocks"])
def test_a_forged_target_changes_no_byte_of_d(keyed, forgery):
    sched = PrefillScheduler(BS, keyed.config)
    signer = {"unsigned": None, "wrong key": Keys(OTHER_KEY.encode())}.get(forgery, keyed.keys)
    params = target_params(keyed, signer, f"f-{forgery}", (3, 4), f"{forgery:x<32}")
    if forgery == "tampered blocks":
        params["pdpush"]["d_block_ids"] = [5, 6]  # the blocks of someone else's request
    before = d_bytes(keyed)
    push_through_p(keyed, sched, f"p-{forgery}", params, 2 * BS)
    assert same_bytes(before, d_bytes(keyed))
    assert sched.forbidden_requests == 1 and sched.pushed_requests == 0


def test_a_replayed_target_changes_no_byte_of_d(keyed):
    sched = PrefillScheduler(BS, keyed.config)
    params = target_params(keyed, keyed.keys, "r-replay", (7, 8), "replay".ljust(32, "0"))
    keyed.d.bind(DecodeStepMeta(expect={"r-replay": [7, 8]}, nonces={"r-replay": "replay".ljust(32, "0")}))
    push_through_p(keyed, sched, "p-first", params, 2 * BS)
    assert torch.equal(keyed.d_kv["l0"][7], keyed.p_kv["l0"][0])  # the genuine push landed
    for name in LAYERS:  # D reuses blocks 7 and 8 for another request
        keyed.d_kv[name][7:9] = 0
    before = d_bytes(keyed)
    push_through_p(keyed, sched, "p-replayed", params, 2 * BS)  # someone replays D's request
    assert same_bytes(before, d_bytes(keyed))
    assert sched.forbidden_requests == 1


@pytest.mark.parametrize("age_check", [True, False], ids=["guard", "control-nonces-only"])
def test_a_target_replayed_after_p_forgot_its_nonce_changes_no_byte_of_d(keyed, age_check,
                                                                         monkeypatch):
    """D signed target A, and 700 s later (its clock) target B; P forgot A's nonce (its memory
    is bounded) and someone replays A into blocks D reused. Without the age check the replay
    lands (the control must fail to protect D)."""
    sched = PrefillScheduler(BS, keyed.config)
    if not age_check:
        monkeypatch.setattr(ReplayGuard, "_age", lambda self, source, offset, now: 0.0)
    now = time.monotonic()
    a = signed_target(keyed.keys, "r-a", (9, 10), f"127.0.0.1:{keyed.port}", "a" * 32,
                      issued_s=now - 700)
    b = signed_target(keyed.keys, "r-b", (5, 6), f"127.0.0.1:{keyed.port}", "b" * 32,
                      issued_s=now)
    for req, params in (("p-a", a), ("p-b", b)):
        sched.get_num_new_matched_tokens(RequestView(req, 2 * BS, 2 * BS, [], params), 0)
    assert sched.forbidden_requests == 0
    sched.replays.nonces = NonceMemory()  # what 10 minutes or 100 000 targets do
    for name in LAYERS:  # blocks 9 and 10 belong to another request of D now
        keyed.d_kv[name][9:11] = 0
    before = d_bytes(keyed)
    push_through_p(keyed, sched, "p-replayed", a, 2 * BS)
    assert same_bytes(before, d_bytes(keyed)) is age_check
    assert sched.forbidden_requests == int(age_check)


def intruder(env, name: str) -> tuple[TransferEngine, str]:
    """A NIXL agent that fetched D's metadata from its side channel, as any P can."""
    engine = TransferEngine(name)
    desc = get_json(f"http://127.0.0.1:{env.port}/meta", 5)
    return engine, engine.add_peer(base64.b64decode(desc["metadata"]))


def received(env, sender: TransferEngine | None = None, seconds: float = 1.0) -> tuple[set, set]:
    """What D reports received and failed while it (and the sender, for UCX) makes progress."""
    done, failed = set(), set()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sender is not None:
            sender.progress()
        got = env.d.transfer_results(set())
        done, failed = done | got.received, failed | got.failed
    return done, failed


def test_only_the_chosen_p_settles_a_request_on_d(keyed):
    nonce = "chosen".ljust(32, "0")
    keyed.d.bind(DecodeStepMeta(expect={"r-n": [9]}, nonces={"r-n": nonce}))
    keyed.d.take_counts()
    evil, d_agent = intruder(keyed, "pdpush-p-evil-0")
    try:
        forged = [  # another agent: with a guessed nonce, posing as the P, or unsigned
            Notif("r-n", True, 0, "", "guess".ljust(32, "0"), "pdpush-p-evil-0").signed(keyed.keys),
            Notif("r-n", True, 0, "", nonce, keyed.p.agent_name).signed(keyed.keys),
            Notif("r-n", True, 0, "", nonce, "pdpush-p-evil-0"),
            Notif("r-n", False, 0, "boom", "guess".ljust(32, "0"), "pdpush-p-evil-0"),
        ]
        for notif in forged:
            evil.notify(d_agent, notif.encode())
        assert received(keyed, evil) == (set(), set())
        assert keyed.d.take_counts()["notifs_refused"] == len(forged)
    finally:
        evil.close()
    sched = PrefillScheduler(BS, keyed.config)
    params = target_params(keyed, keyed.keys, "r-n", (9,), nonce)
    assert push_through_p(keyed, sched, "p-n", params, BS) == {"r-n"}  # the chosen P's word does
