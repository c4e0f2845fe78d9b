"""The serving paths `pdpush bench serving` compares, started once and kept up across measurements.

1. pdpush: 1P1D with the pdpush connector; clients talk to D only (D's /stats gives the timings).
2. local: one aggregated vLLM server, placed where D is (no connector).
3. nixl-pull / nixl-push: vLLM's NixlConnector / NixlPushConnector 1P1D behind the proxy flow vLLM
   documents (pdpush.bench.nixl_proxy).

Every server gets the same model, engine arguments and placement rule (pdpush.local.cluster:
P slots on the P GPU or the cores after 0, D slots on the D GPU or core 0), so the paths compare on
the same GPU share. On a GPU with `kv_cache_gib` set, every server gets a fixed KV cache
(--kv-cache-memory-bytes), which skips vLLM's memory profiling; only then can the servers start
all at once (`parallel`) without one engine's loading skewing another's KV cache size. Each then
keeps its own vLLM cache folder, so concurrent torch.compile runs never share files.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from pdpush.local.cluster import (
    GpuPlacement, ServerError, VllmServer, free_port, kv_cache_settings, placed_server,
)

PATHS = ("pdpush", "local", "nixl-pull", "nixl-push")
NIXL_CONNECTORS = {"nixl-pull": "NixlConnector", "nixl-push": "NixlPushConnector"}
START_TIMEOUT_S = 600.0


@dataclass
class Setup:
    model: Path
    log_dir: Path
    gpus: GpuPlacement | None = None
    engine_args: list[str] = field(default_factory=list)  # every server, e.g. --dtype bfloat16
    prefill_args: list[str] = field(default_factory=list)  # every P, e.g. its token budget
    kv_cache_gib: float | None = None
    max_model_len: int = 4096
    parallel: bool = False

    def server(self, name: str, prefill_index: int | None, kv_config: dict | None = None,
               env: dict[str, str] | None = None) -> VllmServer:
        kv_env, kv_args = kv_cache_settings(self.kv_cache_gib, self.gpus)
        env, args = {**kv_env, **(env or {})}, [*self.engine_args, *kv_args]
        if prefill_index is not None:
            args += self.prefill_args
        if self.parallel:
            env["VLLM_CACHE_ROOT"] = str(Path.home() / ".cache" / "vllm-pdpush-bench" / name)
        return placed_server(name, self.model, self.gpus, prefill_index, kv_transfer_config=kv_config,
                             extra_args=args, env=env, log_dir=self.log_dir,
                             max_model_len=self.max_model_len)


@dataclass
class ServingPath:
    name: str
    servers: list[VllmServer]  # in start order: P before D
    stats_url: str | None = None  # pdpush D's /stats
    proxy_port: int | None = None  # NIXL paths: the proxy clients talk to
    proxy: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        if self.proxy_port is not None:
            return f"http://127.0.0.1:{self.proxy_port}"
        return self.servers[-1].url


def build(name: str, setup: Setup) -> ServingPath:
    from pdpush.connector.config import decode_kv_config, prefill_kv_config

    if name == "pdpush":
        stats_port = free_port()
        p = setup.server("pdpush-P", 0, prefill_kv_config())
        d = setup.server("pdpush-D", None, decode_kv_config(
            [p.url], remote_threshold_tokens=64, health_interval_s=1.0, retry_after_s=1.0,
            side_channel_port=free_port(), stats_port=stats_port))
        return ServingPath(name, [p, d], stats_url=f"http://127.0.0.1:{stats_port}/stats")
    if name == "local":
        return ServingPath(name, [setup.server("local", None)])
    connector = NIXL_CONNECTORS[name]
    device = "cpu" if setup.gpus is None else "cuda"

    def nixl(role: str, index: int | None) -> VllmServer:
        env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
        config = {"kv_connector": connector, "kv_role": role, "kv_buffer_device": device}
        return setup.server(f"{name}-{'P' if index is not None else 'D'}", index, config, env)

    return ServingPath(name, [nixl("kv_producer", 0), nixl("kv_consumer", None)], proxy_port=free_port())


@contextlib.contextmanager
def started(names: list[str], setup: Setup) -> Iterator[dict[str, ServingPath]]:
    """Every path up (and healthy) inside the block; everything stopped after it, however it ends."""
    paths = {name: build(name, setup) for name in names}
    servers = [s for path in paths.values() for s in path.servers]
    try:
        if setup.parallel:
            for server in servers:
                server.start()
        for server in servers:
            if not setup.parallel:
                server.start()
            server.wait_healthy(START_TIMEOUT_S)
        for path in paths.values():
            if path.proxy_port is not None:
                path.proxy = _start_proxy(path, setup.log_dir)
        yield paths
    finally:
        for path in paths.values():
            if path.proxy is not None:
                path.proxy.terminate()
                path.proxy.wait(10)
        for server in servers:
            server.stop()


def _start_proxy(path: ServingPath, log_dir: Path) -> subprocess.Popen:
    p, d = path.servers
    log = open(log_dir / f"{path.name}-proxy.log", "wb")  # noqa: SIM115 (kept open with the process)
    proc = subprocess.Popen([sys.executable, "-m", "pdpush.bench.nixl_proxy", "--port", str(path.proxy_port),
                             "--prefill", p.url, "--decode", d.url], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerError(f"{path.name} proxy exited; see {log_dir / f'{path.name}-proxy.log'}")
        try:
            if httpx.get(f"{path.url}/health", timeout=2.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise ServerError(f"{path.name} proxy not answering after 60 s")
