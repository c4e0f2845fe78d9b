"""D's do_prefill client: asynchronous, off the scheduler thread, with deadlines and cancel.

do_prefill is P's OpenAI `/v1/completions` with the prompt as token ids, `max_tokens=1` and the
push target in `kv_transfer_params`; P answers with its first token. Cancelling the call closes
the HTTP connection, which makes P's server abort the request (and P's connector tell D).

All network work runs on one asyncio loop in a daemon thread. The scheduler thread only calls
`submit`, `cancel` and the non-blocking `drain_*` methods, so it never waits on a P.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from pdpush.rpc.release import RELEASED_KEY, release_body
from pdpush.vllm_api import WAITING_REQUESTS, metric_sum

GONE_CHECK_TIMEOUT_S = 2.0
JSON_HEADERS = {"content-type": "application/json"}
GONE_CHECK_WINDOW_S, GONE_CHECK_ATTEMPT_S, GONE_CHECK_RETRY_S = 3.0, 0.5, 0.1  # `_refused`


# HTTP statuses P's server gives before its engine sees a request: 401 (vLLM's --api-key
# middleware) and 403 (a pdpush peer check refusing D). P's connector's own refusal of a push
# target comes as `pdpush_error` in a 200 answer: it refused in its first hook, before any push.
REJECTED_BEFORE_ENGINE = (401, 403)


# Error kinds a P answers before its engine sees the request (pdpush.connector.auth_middleware),
# as the `type` "pdpush_<kind>" of an OpenAI-style error body; PrefillResult.kind carries them.
FORBIDDEN = "forbidden"  # 403: the push target's signature or nonce did not verify
D_UNREACHABLE = "d_unreachable"  # 503: P cannot reach the side channel the target names
WRONG_D = "wrong_d"  # 503: something else answers there (another D, or another start of it)
KINDS = (FORBIDDEN, D_UNREACHABLE, WRONG_D)


def error_body(status: int, kind: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": f"pdpush_{kind}", "code": status}}


def error_kind(body: Any) -> str:
    """The pdpush error kind of a P's error answer ("" for any other answer)."""
    try:
        kind = str(body["error"]["type"]).removeprefix("pdpush_")
    except (KeyError, TypeError):
        return ""
    return kind if kind in KINDS else ""


@dataclass
class PrefillJob:
    req_id: str  # D's engine request id
    url: str  # P's base URL
    prompt_token_ids: list[int]
    sampling: dict[str, Any]  # OpenAI sampling fields for P's one token (temperature, seed, ...)
    kv_transfer_params: dict[str, Any]
    deadline: float  # time.monotonic(); the call is abandoned after it


@dataclass
class PrefillResult:
    req_id: str
    url: str
    ok: bool
    first_token: int | None = None
    error: str = ""
    # False only on a confirmed "nothing written" (see `_post`): the connection was refused
    # before the request was sent, or P rejected the request before its engine or its connector
    # pushed anything. Then D may reuse the blocks at once instead of waiting for the lease.
    may_have_written: bool = True
    # P's process ended: the call's connection was refused or reset and a health check right
    # after was refused too. Nothing of P's can land any more (docs/architecture.md).
    p_gone: bool = False
    cancelled: bool = False  # D abandoned the call (client abort): no verdict on P
    kind: str = ""  # one of KINDS when P refused before its engine saw the request
    at: float = field(default_factory=time.monotonic)  # when the outcome was known
    sent_at: float = 0.0  # when the HTTP request left (monotonic), for the TTFT breakdown
    p_ms: dict[str, float] | None = None  # P's stage offsets (pdpush.connector.timing.PushTimes)


@dataclass
class ReleaseAnswer:
    """P's answer to "may D release the blocks it holds for req_id?" (rpc/release.py)."""

    req_id: str
    url: str
    released: bool
    at: float = field(default_factory=time.monotonic)


@dataclass
class HealthReport:
    url: str
    ok: bool
    queue: int = 0
    refused: bool = False  # nothing listens on P's port: its process ended (or never started)
    at: float = field(default_factory=time.monotonic)  # when the check answered


@dataclass
class _Loop:
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self.loop.run_forever, name="pdpush-rpc", daemon=True)
        self.thread.start()

    def call(self, coro) -> "asyncio.Future":
        return asyncio.run_coroutine_threadsafe(coro, self.loop)


class PrefillClient:
    """Sends do_prefill calls and health checks; results are collected by `drain_results`."""

    def __init__(self, urls: tuple[str, ...], health_interval_s: float) -> None:
        self._urls = urls
        self._health_interval_s = health_interval_s
        self._results: queue.Queue[PrefillResult] = queue.Queue()
        self._health: queue.Queue[HealthReport] = queue.Queue()
        self._calls: dict[str, Any] = {}
        self._refusing: frozenset[str] = frozenset()  # replaced, never changed: a safe snapshot
        self._lock = threading.Lock()
        self._loop = _Loop()
        self._loop.start()
        self._client: httpx.AsyncClient = self._loop.call(self._make_client()).result()
        self._health_task: asyncio.Task = self._loop.call(self._start_health()).result()

    @staticmethod
    async def _make_client() -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=httpx.Limits(max_connections=256), trust_env=False)

    async def _start_health(self) -> asyncio.Task:
        return asyncio.create_task(self._health_loop())

    async def _stop(self) -> None:
        self._health_task.cancel()
        await asyncio.gather(self._health_task, return_exceptions=True)
        await self._client.aclose()

    def submit(self, job: PrefillJob) -> None:
        # Stored under the lock the call's own clean-up takes: a call that ends at once (P
        # unreachable) cannot remove its entry before it is stored, and so leave it behind.
        with self._lock:
            self._calls[job.req_id] = self._loop.call(self._do_prefill(job))

    def cancel(self, req_id: str) -> bool:
        """Abandon a call (P aborts the request on disconnect); True if one was in flight."""
        with self._lock:
            future = self._calls.pop(req_id, None)
        return bool(future and future.cancel())

    def ask_release(self, url: str, req_id: str, signature: str = "") -> None:
        """Ask P whether D may release what it holds for req_id; the answer comes as a
        ReleaseAnswer through drain_results (none when P does not answer)."""
        self._loop.call(self._ask_release(url, req_id, signature))

    async def _ask_release(self, url: str, req_id: str, signature: str) -> None:
        try:
            resp = await self._client.post(f"{url}/v1/completions",
                                           json=release_body(req_id, signature),
                                           timeout=GONE_CHECK_TIMEOUT_S * 5)
            if resp.status_code != 200:
                return
            params = resp.json().get("kv_transfer_params") or {}
        except (httpx.HTTPError, ValueError):
            return
        if params.get(RELEASED_KEY) is not None:
            self._results.put(ReleaseAnswer(req_id, url, params[RELEASED_KEY] is True))

    def drain_results(self) -> list[PrefillResult | ReleaseAnswer]:
        return _drain(self._results)

    def drain_health(self) -> list[HealthReport]:
        return _drain(self._health)

    def refusing(self) -> frozenset[str]:
        """The Ps whose last health check was refused, known here before D applies the reports
        (which it does only when it steps; an idle D would send its next request to a dead P)."""
        return self._refusing

    def close(self) -> None:
        with self._lock:
            for future in self._calls.values():
                future.cancel()
            self._calls.clear()
        self._loop.call(self._stop()).result(timeout=5)
        self._loop.loop.call_soon_threadsafe(self._loop.loop.stop)

    async def _do_prefill(self, job: PrefillJob) -> None:
        result = PrefillResult(job.req_id, job.url, ok=False)
        try:
            # One overall limit: httpx's timeout is per read, and P may trickle or stall.
            result = await asyncio.wait_for(self._post(job),
                                            max(0.1, job.deadline - time.monotonic()))
        except asyncio.CancelledError:
            result.error, result.cancelled = "cancelled by D", True
            raise
        except httpx.ConnectError as exc:  # no connection, so no request was sent
            result.error = f"cannot reach {job.url}: {exc}"
            result.may_have_written = False
            result.p_gone = _is_refused(exc) and await self._refused(job.url)
            result.at = time.monotonic()
        except (httpx.RemoteProtocolError, httpx.ReadError) as exc:  # reset or closed mid-call
            result.error = f"{job.url} dropped the connection: {exc!r}"
            result.p_gone = await self._refused(job.url)
            result.at = time.monotonic()
        except (httpx.TimeoutException, asyncio.TimeoutError):
            result.error = f"no answer from {job.url} before the deadline"
        except httpx.HTTPError as exc:
            result.error = f"do_prefill to {job.url} failed: {exc!r}"
        finally:
            result.at = time.monotonic()  # applied as of now, not as of the call's start
            with self._lock:
                self._calls.pop(job.req_id, None)
            self._results.put(result)

    async def _post(self, job: PrefillJob) -> PrefillResult:
        sent_at = time.monotonic()
        resp = await self._client.post(f"{job.url}/v1/completions", headers=JSON_HEADERS,
                                       content=encode_job(job), timeout=None)
        if resp.status_code != 200:
            # Only an authentication refusal (or a pdpush error kind: the API-server guard) is
            # answered before P's engine sees the request; vLLM answers 400 also for errors
            # raised after its engine started it (P may have pushed).
            kind = error_kind(_json_or_none(resp))
            return PrefillResult(job.req_id, job.url, False, error=f"P answered {resp.status_code}: "
                                 f"{resp.text[:200]}", kind=kind,
                                 may_have_written=resp.status_code not in REJECTED_BEFORE_ENGINE
                                 and not kind)
        data = resp.json()
        choice = data["choices"][0]
        params = data.get("kv_transfer_params") or {}
        if params.get("pdpush_error"):
            return PrefillResult(job.req_id, job.url, False, error=str(params["pdpush_error"]),
                                 may_have_written=False)
        tokens = choice.get("token_ids") or []
        p_ms = (params.get("pdpush") or {}).get("p_ms")
        return PrefillResult(job.req_id, job.url, True, first_token=tokens[0] if tokens else None,
                             sent_at=sent_at, p_ms=p_ms if isinstance(p_ms, dict) else None)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.gather(*(self._check(url) for url in self._urls))
            await asyncio.sleep(self._health_interval_s)

    async def _refused(self, url: str) -> bool:
        """Health checks after a dropped connection, for up to GONE_CHECK_WINDOW_S: refused means
        P's process ended, any answer that it did not. A killed P's port closes only once all its
        processes have exited (vLLM's engine processes, forked from the API server, share its
        listening socket, and a large one takes a while to tear down); until then connects are
        accepted and then reset or left unanswered, which says nothing either way."""
        end = time.monotonic() + GONE_CHECK_WINDOW_S
        while (left := end - time.monotonic()) > 0:
            try:
                await self._client.get(f"{url}/health", timeout=min(left, GONE_CHECK_ATTEMPT_S))
                return False
            except httpx.HTTPError as exc:
                if _is_refused(exc):
                    return True
            await asyncio.sleep(GONE_CHECK_RETRY_S)
        return False

    async def _check(self, url: str) -> None:
        timeout = max(5.0, self._health_interval_s)  # a busy P answers slowly; a dead one at once
        try:
            health = await self._client.get(f"{url}/health", timeout=timeout)
            metrics = await self._client.get(f"{url}/metrics", timeout=timeout)
            ok = health.status_code == 200
            queue = metric_sum(metrics.text, WAITING_REQUESTS) if metrics.status_code == 200 else 0
            self._refusing = self._refusing - {url}
            self._health.put(HealthReport(url, ok, int(queue)))
        except httpx.ConnectError as exc:
            if refused := _is_refused(exc):
                self._refusing = self._refusing | {url}
            self._health.put(HealthReport(url, False, refused=refused))
        except (httpx.HTTPError, ValueError, IndexError):  # /metrics that is not Prometheus text
            self._health.put(HealthReport(url, False))


def encode_job(job: PrefillJob) -> bytes:
    """do_prefill's body: P computes the prompt and samples one token. msgspec takes about a
    tenth of json.dumps's time for a long prompt's token ids (`pdpush bench wire`)."""
    return msgspec.json.encode({
        "prompt": job.prompt_token_ids,
        "max_tokens": 1,
        "return_token_ids": True,
        "kv_transfer_params": job.kv_transfer_params,
        **job.sampling,
    })


def _is_refused(exc: BaseException) -> bool:
    """Connection refused (nothing listens), as opposed to a timeout or no route to the host."""
    while exc is not None:
        if isinstance(exc, ConnectionRefusedError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _json_or_none(resp: httpx.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        return None


def _drain(q: queue.Queue) -> list:
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items
