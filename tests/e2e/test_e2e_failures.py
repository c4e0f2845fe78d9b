"""Two P instances and the failure contract, on real vLLM CPU engines.

D sends to P0 and P1 (each P runs one request at a time and accepts at most 2048 tokens, D
4096). Every request must complete with the aggregated engine's greedy tokens whatever happens
to its prefill: P erroring, P frozen past the deadline, the client aborting while D waits for KV,
a P killed mid-run. Free block counts return to their baseline after each test.
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (
    LOG_DIR, complete, make_prompt, reference_outputs, stats, tokens, wait_free_blocks,
    wait_refusing, where,
)

from pdpush.connector.auth import write_key_file
from pdpush.local.cluster import PREFILL_MIDDLEWARE, VllmServer, free_port
from pdpush.connector.config import decode_kv_config, prefill_kv_config

pytestmark = pytest.mark.e2e
MAX_TOKENS = 6
TIMEOUT_S = 4.0
GRACE_S = 1.0
RETRY_S = 3.0  # a P's circuit breaker lets a trial request through this long after its last failure
P_MAX_LEN = 2048
PARALLEL = {f"par{i}": make_prompt(1500, 100 + i) for i in range(6)}
LATER = {f"later{i}": make_prompt(300, 200 + i) for i in range(3)}
PROMPTS = {**PARALLEL, **LATER, "too_long_for_p": make_prompt(P_MAX_LEN + 100, 300),
           "deadline": make_prompt(600, 301), "aborted": make_prompt(900, 302)}
P_ARGS = ["--max-num-batched-tokens", "512", "--max-num-seqs", "1", "--max-model-len", str(P_MAX_LEN)]


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return reference_outputs(tiny_model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, reference):
    ports = {name: free_port() for name in ("P0", "P1", "D")}
    key_file = write_key_file()  # authenticated, as every served cluster should be
    auth = {"auth_key_file": str(key_file)}
    prefills = [VllmServer(f"fail-{name}", tiny_model, cpu_core=1,
                           extra_args=[*P_ARGS, "--middleware", PREFILL_MIDDLEWARE],
                           kv_transfer_config=prefill_kv_config(stats_port=ports[name], **auth),
                           log_dir=LOG_DIR) for name in ("P0", "P1")]
    d_config = decode_kv_config(
        [p.url for p in prefills], remote_threshold_tokens=64, side_channel_port=free_port(), **auth,
        stats_port=ports["D"], prefill_timeout_s=TIMEOUT_S, lease_grace_s=GRACE_S,
        health_interval_s=1.0, retry_after_s=RETRY_S)
    decode = VllmServer("fail-D", tiny_model, kv_transfer_config=d_config, cpu_core=0, log_dir=LOG_DIR)
    servers = [*prefills, decode]
    try:
        for server in prefills:  # D only after its Ps answer: its first health checks count
            server.start()
        for server in prefills:
            server.wait_healthy(300)
        decode.start()
        decode.wait_healthy(300)
        baseline = {name: stats(port)["free_blocks"] for name, port in ports.items()}
        yield {"P": prefills, "D": decode, "ports": ports, "baseline": baseline}
    finally:
        for server in servers:
            server.stop()
        key_file.unlink()


@pytest.fixture(autouse=True)
def blocks_back_to_baseline(cluster):
    yield
    for name, port in cluster["ports"].items():
        if name == "P1" and not cluster["P"][1].alive():
            continue
        baseline = cluster["baseline"][name]
        assert wait_free_blocks(port, baseline) == baseline, f"{name} leaked: {stats(port)}"


def d_stats(cluster) -> dict:
    return stats(cluster["ports"]["D"])


def test_two_prefills_share_load(cluster, reference):
    with ThreadPoolExecutor(len(PARALLEL)) as pool:
        bodies = dict(zip(PARALLEL, pool.map(
            lambda p: complete(cluster["D"].url, p, MAX_TOKENS), PARALLEL.values())))
    for name, body in bodies.items():
        assert tokens(body) == reference[name], name
    used = {where(b).get("url") for b in bodies.values() if where(b)["prefill"] == "remote"}
    assert used == {p.url for p in cluster["P"]}


def test_erroring_prefill_falls_back_when_the_lease_ends(cluster, reference):
    """vLLM answers 400 also for errors raised after its engine started a request, so a 400 is
    no proof that P wrote nothing: D keeps the blocks until the lease ends, then recomputes."""
    start = time.monotonic()
    body = complete(cluster["D"].url, PROMPTS["too_long_for_p"], MAX_TOKENS)
    assert where(body)["prefill"] == "fallback"
    assert "P answered 400" in where(body)["error"]
    assert TIMEOUT_S <= time.monotonic() - start < TIMEOUT_S + GRACE_S + 8
    assert tokens(body) == reference["too_long_for_p"]


def test_prefill_past_deadline_falls_back_without_hanging(cluster, reference):
    """Both P frozen (SIGSTOP) for longer than the deadline: D falls back once the lease ends,
    and P, thawed after it, must write nothing into D's blocks (the fixture checks the counts)."""
    freeze(cluster["P"], signal.SIGSTOP)
    try:
        start = time.monotonic()
        body = complete(cluster["D"].url, PROMPTS["deadline"], MAX_TOKENS)
        elapsed = time.monotonic() - start
    finally:
        freeze(cluster["P"], signal.SIGCONT)
        # Health checks that timed out while frozen opened the breakers: after RETRY_S a trial
        # request may close them again (a good health check alone does not); later tests need them.
        time.sleep(RETRY_S + 3.0)
    assert where(body)["prefill"] == "fallback"
    assert TIMEOUT_S <= elapsed < TIMEOUT_S + GRACE_S + 8  # bounded: no hang (slack: 2 busy cores)
    assert tokens(body) == reference["deadline"]


def test_client_abort_while_waiting_for_kv_releases_blocks(cluster, reference):
    """Both P frozen (SIGSTOP): the request surely waits for KV when the client gives up."""
    before = d_stats(cluster)["aborted_waiting"]
    freeze(cluster["P"], signal.SIGSTOP)
    try:
        with pytest.raises(httpx.TimeoutException):
            complete(cluster["D"].url, PROMPTS["aborted"], MAX_TOKENS, timeout=1.5)
    finally:
        freeze(cluster["P"], signal.SIGCONT)
    assert d_stats(cluster)["aborted_waiting"] == before + 1
    # Blocks come back (fixture) once P confirmed or the lease ended; D still serves it right.
    assert tokens(complete(cluster["D"].url, PROMPTS["aborted"], MAX_TOKENS)) == reference["aborted"]


def freeze(servers: list[VllmServer], sig: int) -> None:
    for server in servers:
        os.killpg(server._proc.pid, sig)  # the server runs in its own process group


def test_killed_prefill_requests_complete_and_later_ones_avoid_it(cluster, reference):
    dead = cluster["P"][1]
    with ThreadPoolExecutor(len(PARALLEL)) as pool:
        futures = {name: pool.submit(complete, cluster["D"].url, p, MAX_TOKENS)
                   for name, p in PARALLEL.items()}
        time.sleep(0.5)
        dead.kill()
        bodies = {name: f.result() for name, f in futures.items()}
    for name, body in bodies.items():
        assert tokens(body) == reference[name], name
    wait_refusing(cluster["ports"]["D"], dead.url)  # D noticed, even if no request failed
    for name, prompt in LATER.items():
        body = complete(cluster["D"].url, prompt, MAX_TOKENS)
        assert where(body).get("url") == cluster["P"][0].url, where(body)
        assert tokens(body) == reference[name]
    assert d_stats(cluster)["prefills"][dead.url]["healthy"] is False
