"""Start and stop local vLLM OpenAI servers (P and D roles) as subprocesses.

Used by `pdpush up`, the benchmarks and the end-to-end tests. Each server runs in its own process
session so that stopping it also stops vLLM's engine-core and worker children; output goes to a log
file whose tail is shown when a server fails to come up.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

# On vLLM's CPU backend --gpu-memory-utilization is the fraction of the machine's memory a worker
# reserves, and the worker refuses to start when that is more than is free at the time, which the
# second of two engines on a small machine often finds (hence 0.2 in `command`).
# VLLM_CPU_KVCACHE_SPACE=N instead fixes the KV cache at N GiB and skips that check (vLLM 0.32:
# vllm/platforms/cpu.py, vllm/v1/worker/cpu_worker.py); 1 GiB holds the tiny model's contexts.
CPU_DEFAULTS = {"VLLM_CPU_KVCACHE_SPACE": "1"}
# P's API-server guard against push targets D did not sign (pdpush.connector.auth_middleware).
PREFILL_MIDDLEWARE = "pdpush.connector.auth_middleware.PushAuthMiddleware"


PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the thread that started it dies, so a killed
    pdpush never leaves vLLM servers behind (vLLM's own children follow their parent down)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass(frozen=True)
class GpuPlacement:
    """P and D on CUDA GPUs: which device each gets and the share of its memory each takes.

    On one GPU (p_gpu == d_gpu) both engines share it, so each takes `share` of its memory
    (vLLM's --gpu-memory-utilization; the two shares must leave room for both). On separate GPUs
    each engine takes `separate_share`. No CPU settings apply (core pinning, CPU KV cache size);
    block size and CUDA graphs stay vLLM's defaults, and P gets piecewise graphs from the
    connector (PdpushConnector.requires_piecewise_for_cudagraph).
    """

    p_gpus: tuple[int, ...] = (0,)  # P i runs on p_gpus[i % len(p_gpus)]
    d_gpu: int = 0
    share: float = 0.3
    separate_share: float = 0.85

    def for_prefill(self, index: int) -> tuple[int, float]:
        gpu = self.p_gpus[index % len(self.p_gpus)]
        return gpu, self._share(gpu)

    def for_decode(self) -> tuple[int, float]:
        return self.d_gpu, self._share(self.d_gpu)

    def _share(self, gpu: int) -> float:
        shared = [*self.p_gpus, self.d_gpu].count(gpu) > 1
        return self.share if shared else self.separate_share


class ServerError(RuntimeError):
    """A server exited or did not become healthy in time."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now and that this process has not handed out
    before: the servers bind their ports only when they start, so the kernel may offer a port
    chosen a moment ago again (seen in CI: D's side channel on P0's HTTP port)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


class _Started:
    """`with X(...) as x:` starts x, waits until healthy, and always stops what was started."""

    def __enter__(self):
        try:
            self.start()
            self.wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@dataclass
class VllmServer(_Started):
    """One `vllm.entrypoints.openai.api_server` process.

    `cpu_core` pins the engine's OpenMP threads (VLLM_CPU_OMP_THREADS_BIND). With vLLM's default
    ("auto") each engine binds threads to every core of the node, so two engines on a 2-core
    machine share both cores and D's decode step waits on P's prefill; one core each keeps them
    apart.
    `gpu` runs it on that CUDA device instead (CUDA_VISIBLE_DEVICES) with `gpu_share` of its
    memory, and none of the CPU settings.
    `kv_transfer_config` is passed as `--kv-transfer-config` JSON. Output goes to `log_path`.
    """

    name: str
    model: Path
    port: int = field(default_factory=free_port)
    kv_transfer_config: dict | None = None
    cpu_core: int | None = None
    gpu: int | None = None
    gpu_share: float = 0.3
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_dir: Path = Path("out/logs")
    max_model_len: int = 4096
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.log_dir / f"{self.name}.log"

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model), "--served-model-name", "pdpush",
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len),
            "--gpu-memory-utilization", str(self.gpu_share if self.gpu is not None else 0.2),
            "--seed", "0",
        ]
        if self.kv_transfer_config is not None:
            cmd += ["--kv-transfer-config", json.dumps(self.kv_transfer_config)]
        return cmd + self.extra_args

    def start(self) -> "VllmServer":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.gpu is not None:
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(self.gpu), **self.env}
        else:
            env = {**os.environ, **CPU_DEFAULTS, **self.env}
            if self.cpu_core is not None:
                env["VLLM_CPU_OMP_THREADS_BIND"] = str(self.cpu_core)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        return self

    def wait_healthy(self, timeout_s: float = 240.0) -> None:
        """Block until GET /health answers 200; raise ServerError with the log tail otherwise."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                raise ServerError(f"{self.name} exited during start-up\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise ServerError(f"{self.name} not healthy after {timeout_s:.0f} s\n{self.log_tail()}")

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group: the abrupt failure of a P, for failure tests."""
        self._signal_group(signal.SIGKILL)

    def stop(self, grace_s: float = 20.0) -> None:
        """SIGTERM the process group, then SIGKILL what is left after `grace_s`."""
        if self._proc is None:
            return
        self._signal_group(signal.SIGTERM)
        try:
            self._proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        self._signal_group(signal.SIGKILL)
        self._proc.wait()
        self._proc = None

    def _signal_group(self, sig: int) -> None:
        if self._proc is None:
            return
        try:
            os.killpg(self._proc.pid, sig)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


@dataclass
class LocalCluster(_Started):
    """N prefill servers and one decode server on this machine.

    The Ps start first and D only once they answer /health: D's connector health-checks its Ps from
    the moment it starts, and a check that finds a P still loading marks it down, so requests sent
    right after start-up would all be prefilled locally.

    Cores: D gets core 0 and the Ps share the remaining cores (all of them on core 1 on a 2-core
    machine), so P's prefill never competes with D's decode for a core. With `gpus` the servers run
    on CUDA devices instead (GpuPlacement), started one after the other there too: vLLM sizes its
    KV cache from the memory it finds free, which another engine loading meanwhile would skew.

    Authenticated by default: a fresh key file (mode 0600, removed by `stop`) is given to D and
    every P, and the Ps run pdpush's API-server guard (`PREFILL_MIDDLEWARE`), so a push target
    that D did not sign is refused with 403 (docs/architecture.md, "Trust model").
    `authenticate=False`, or an `auth_key_file` / `auth_key_env` in the opts, turns that off.
    """

    model: Path
    num_prefill: int = 1
    decode_opts: dict = field(default_factory=dict)
    prefill_opts: dict = field(default_factory=dict)
    decode_args: list[str] = field(default_factory=list)
    # A small token budget on P, so a long prompt is prefilled (and pushed) in several chunks.
    prefill_args: list[str] = field(default_factory=lambda: ["--max-num-batched-tokens", "512"])
    log_dir: Path = Path("out/logs")
    gpus: GpuPlacement | None = None
    max_model_len: int = 4096
    authenticate: bool = True
    prefills: list[VllmServer] = field(default_factory=list, init=False)
    decode: VllmServer | None = field(default=None, init=False)
    key_file: Path | None = field(default=None, init=False)

    def start(self) -> "LocalCluster":
        from pdpush.connector.auth import write_key_file
        from pdpush.connector.config import decode_kv_config, prefill_kv_config

        keyed = {"auth_key_file", "auth_key_env"} & {*self.decode_opts, *self.prefill_opts}
        auth, p_args = {}, list(self.prefill_args)
        if self.authenticate and not keyed:
            self.key_file = write_key_file()
            auth = {"auth_key_file": str(self.key_file)}
        if self.authenticate:
            p_args += ["--middleware", PREFILL_MIDDLEWARE]
        self.prefills = [
            self.server(f"P{i}", prefill_kv_config(**auth, **self.prefill_opts), p_args, i)
            for i in range(self.num_prefill)
        ]
        urls = [p.url for p in self.prefills]
        self.decode = self.server("D", decode_kv_config(urls, **auth, **self.decode_opts),
                                  self.decode_args)
        for server in self.prefills:
            server.start()
            if self.gpus is not None:
                server.wait_healthy()
        for server in self.prefills:
            server.wait_healthy()
        self.decode.start()
        return self

    def server(self, name: str, kv_config: dict | None, args: list[str],
               prefill_index: int | None = None) -> VllmServer:
        """A server of this cluster's model, placement and limits (prefill_index None: D's)."""
        return placed_server(name, self.model, self.gpus, prefill_index, kv_transfer_config=kv_config,
                             extra_args=args, log_dir=self.log_dir, max_model_len=self.max_model_len)

    @property
    def servers(self) -> list[VllmServer]:
        return [*self.prefills, *([self.decode] if self.decode else [])]

    def wait_healthy(self, timeout_s: float = 300.0) -> None:
        for server in self.servers:
            server.wait_healthy(timeout_s)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        if self.key_file is not None:
            self.key_file.unlink(missing_ok=True)
            self.key_file = None


def kv_cache_settings(gib: float | None, gpus: GpuPlacement | None) -> tuple[dict[str, str], list[str]]:
    """(env, args) giving a server a KV cache of `gib` GiB: on a GPU --kv-cache-memory-bytes
    (which also skips vLLM's memory profiling), on the CPU VLLM_CPU_KVCACHE_SPACE (whole GiB)."""
    if not gib:
        return {}, []
    if gpus is not None:
        return {}, ["--kv-cache-memory-bytes", str(int(gib * 2**30))]
    return {"VLLM_CPU_KVCACHE_SPACE": str(max(1, round(gib)))}, []


def placed_server(name: str, model: Path, gpus: GpuPlacement | None, prefill_index: int | None,
                  **kwargs) -> VllmServer:
    """A server in a P slot (prefill_index) or D's (None): its GPU and memory share with `gpus`,
    else its CPU core (D core 0, the Ps the others), as LocalCluster places them."""
    if gpus is not None:
        gpu, share = gpus.for_decode() if prefill_index is None else gpus.for_prefill(prefill_index)
        return VllmServer(name, model, gpu=gpu, gpu_share=share, **kwargs)
    p_cores = list(range(1, os.cpu_count() or 2)) or [0]
    core = 0 if prefill_index is None else p_cores[prefill_index % len(p_cores)]
    return VllmServer(name, model, cpu_core=core, **kwargs)
