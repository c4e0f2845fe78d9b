"""Stand-ins shared by the connector's unit tests."""

from __future__ import annotations

from types import SimpleNamespace as NS

from pdpush.vllm_api import RequestView, request_view


def request(req_id: str, n: int, temperature: float = 0.0, params=None, sampling=None,
            **fields) -> RequestView:
    """A view of a vLLM Request with vLLM's own SamplingParams (`sampling`: more of its fields);
    `fields` replace the Request's (cache_salt, lora_request, mm_features, prompt_embeds)."""
    from vllm import SamplingParams

    raw = dict(request_id=req_id, num_prompt_tokens=n, num_tokens=n, prompt_token_ids=list(range(n)),
               kv_transfer_params=params, output_token_ids=[], cache_salt=None, lora_request=None,
               mm_features=[], prompt_embeds=None,
               sampling_params=SamplingParams(temperature=temperature, **(sampling or {})))
    return request_view(NS(**{**raw, **fields}))


class FakeBlocks:
    """D's KV cache manager as the scheduler uses it: records prefix-cache evictions."""

    def __init__(self) -> None:
        self.evicted: list[tuple[int, ...]] = []

    def evict(self, block_ids) -> None:
        self.evicted.append(tuple(block_ids))


class FakeClient:
    def __init__(self) -> None:
        self.jobs, self.cancelled, self.results, self.health = [], [], [], []
        self.asked = []  # (url, req_id) release questions
        self.refused = frozenset()  # what refusing() answers

    def submit(self, job) -> None:
        self.jobs.append(job)

    def cancel(self, req_id: str) -> bool:
        self.cancelled.append(req_id)
        return True

    def ask_release(self, url: str, req_id: str, signature: str = "") -> None:
        self.asked.append((url, req_id))

    def drain_results(self):
        out, self.results = self.results, []
        return out

    def drain_health(self):
        out, self.health = self.health, []
        return out

    def refusing(self):
        return self.refused
