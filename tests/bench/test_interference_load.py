"""The load client against a stand-in OpenAI endpoint (aiohttp): every request of a round can be
open at once, and answers are counted by where D says it prefilled them."""

import asyncio

import pytest
from aiohttp import web

from pdpush.bench.interference.load import Completions, LoadGenerator, RoundSpec

OPEN_AT_ONCE = 150  # background batch + parked load requests; httpx's default pool stops at 100


async def serve(handler):
    app = web.Application()
    app.router.add_post("/v1/completions", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def test_all_requests_of_a_round_are_open_at_once():
    async def main():
        open_now, all_open = 0, asyncio.Event()

        async def handler(request):
            nonlocal open_now
            open_now += 1
            if open_now == OPEN_AT_ONCE:
                all_open.set()
            await all_open.wait()  # like parked requests: nobody answers before all arrived
            return web.json_response({"kv_transfer_params": {"pdpush": {"prefill": "remote"}}})

        runner, url = await serve(handler)
        api = Completions(url, "m")
        try:
            calls = [api.complete([1, 2, 3], 1) for _ in range(OPEN_AT_ONCE)]
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=30)
        finally:
            await api.aclose()
            await runner.cleanup()

    assert asyncio.run(main()) == ["remote"] * OPEN_AT_ONCE


def test_load_is_counted_by_where_it_was_prefilled():
    answers = ["remote", "remote", "local", "error"]

    async def main():
        served = 0

        async def handler(request):
            nonlocal served
            where, served = answers[served % len(answers)], served + 1
            if where == "error":
                return web.json_response({"error": "boom"}, status=500)
            params = {"pdpush": {"prefill": where, **({"reason": "short"} if where == "local" else {})}}
            return web.json_response({"kv_transfer_params": params})

        runner, url = await serve(handler)
        api = Completions(url, "m")
        try:
            load = LoadGenerator(api, RoundSpec(prompt_len=8), qps=200.0, seed=0)
            stop = asyncio.Event()
            task = asyncio.create_task(load.run(stop))
            await asyncio.sleep(0.1)
            stop.set()
            await task
            return len(load.tasks), await load.settle(timeout_s=10)
        finally:
            await api.aclose()
            await runner.cleanup()

    sent, counts = asyncio.run(main())
    expected: dict[str, int] = {}
    for i in range(sent):
        key = {"local": "local (short)", "error": "failed"}.get(answers[i % 4], answers[i % 4])
        expected[key] = expected.get(key, 0) + 1
    assert sent >= 4 and counts == expected


@pytest.mark.parametrize("seed", [0, 1])
def test_load_prompts_never_repeat_the_warm_up_prompts(seed):
    import random

    from pdpush.bench.interference.load import random_prompt

    load = LoadGenerator(None, RoundSpec(prompt_len=16), qps=1.0, seed=seed)
    warm = {tuple(random_prompt(random.Random(f"warm-up {a}"), 16)) for a in range(1, 4)}
    assert tuple(random_prompt(load.rng, 16)) not in warm
