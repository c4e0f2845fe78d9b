"""The pdpush connector's typed configuration and the `--kv-transfer-config` dicts that start
P and D with it.

Everything pdpush reads from `kv_connector_extra_config` is parsed here once, at engine start,
so that a typo or a bad value stops the engine with one clear line (a `ConfigError` naming the
key) instead of surfacing as a stuck request later. Every default is written once, here; the
policy, the step probe and the command line build from these classes. No vLLM import: the
dicts are plain JSON.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pdpush.connector.faults import FAULT_HOOKS_ENV, fault_hooks_allowed
from pdpush.connector.auth import AuthError, Keys, load_keys
from pdpush.connector.network import detect_address, is_local_host, is_loopback, url_host
from pdpush.policy import PolicyConfig

MODULE_PATH = "pdpush.connector.facade"
CONNECTOR_NAME = "PdpushConnector"
ON_FAILURE = ("local", "error")
ON_FIRST_TOKEN_MISMATCH = ("log", "exclude-from-cache", "error")
DECODE_ROLE, PREFILL_ROLE = "kv_consumer", "kv_producer"  # vLLM's kv_role values for D and P
PROBE_RX = ("auto", "rdma", "engine", "none")
PROBE_TIMER = ("auto", "cuda", "cpu")
# Settings that break a guarantee on purpose (the controls of tests that must be able to fail):
# an engine accepts them, set to anything but their default, only when TEST_MODE_ENV is "1".
TEST_MODE_ENV = "PDPUSH_TEST_MODE"
TEST_ONLY_KEYS = ("test_allow_prefill_tokens", "debug_skip_layer_event", "debug_delay_layer_us",
                  "debug_kv_digest")


class ConfigError(ValueError):
    """A bad `kv_connector_extra_config` value; the message names the key."""


@dataclass(frozen=True)
class ProbeConfig:
    """D's step probe (pdpush.probe). Given as a nested `probe` object, or as the flat keys
    `probe_log`, `probe_metrics`, ... that earlier configs and committed results use."""

    # Path of the JSON-lines file, one line per step (appended to).
    log: str | None = None
    # Prometheus endpoint as (host, port); given as a port or "host:port".
    metrics: tuple[str, int] | None = None
    # Where RX bytes come from: RDMA counters when readable (auto), or the transfer engine's count.
    rx: str = "auto"
    # auto | cuda | cpu
    timer: str = "auto"
    # N > 0 alternates windows of N full-probe and N bare steps (measures the probe's own cost).
    ab_steps: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.log or self.metrics)

    @classmethod
    def from_extra(cls, extra: dict[str, Any]) -> "ProbeConfig":
        """The probe part of an extra config: flat `probe_*` keys or a nested `probe` object."""
        flat = {k[len("probe_"):]: v for k, v in extra.items() if k.startswith("probe_")}
        nested = extra.get("probe")
        if nested is not None and flat:
            raise ConfigError("pdpush: give the probe either as `probe` or as `probe_*` keys, not both")
        if nested is not None and not isinstance(nested, dict):
            raise ConfigError(f"pdpush: probe must be an object, got {nested!r}")
        return cls.parse(flat if nested is None else nested, "probe." if nested is not None else "probe_")

    @classmethod
    def parse(cls, raw: dict[str, Any], prefix: str) -> "ProbeConfig":
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(prefix + k for k in raw if k not in known)
        if unknown:
            raise ConfigError(f"pdpush: unknown probe setting(s) {unknown}; "
                              f"known: {[prefix + k for k in known]}")
        ab_steps = raw.get("ab_steps", cls.ab_steps)
        if isinstance(ab_steps, bool) or not isinstance(ab_steps, int) or ab_steps < 0:
            raise ConfigError(f"pdpush: {prefix}ab_steps must be an integer >= 0, got {ab_steps!r}")
        log = raw.get("log")
        return cls(log=None if log is None else str(log),
                   metrics=_endpoint(prefix + "metrics", raw.get("metrics")),
                   rx=_choice(prefix + "rx", raw.get("rx", cls.rx), PROBE_RX),
                   timer=_choice(prefix + "timer", raw.get("timer", cls.timer), PROBE_TIMER),
                   ab_steps=ab_steps)


def _endpoint(key: str, value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    host, _, port = str(value).rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"pdpush: {key} must be a port or host:port, got {value!r}")
    return host or "127.0.0.1", int(port)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"pdpush: {key} must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


@dataclass(frozen=True)
class PdpushConfig:
    """Knobs of both roles. D uses the policy/rpc ones, P the push ones; unknown keys fail."""

    # D only: the P instances (OpenAI base URLs) it may send prefills to. Rejected on P, so that
    # the extra config alone tells the roles apart (see `is_decode_extra`).
    prefill_urls: tuple[str, ...] = ()
    # D: prefill remotely only when at least this many prompt tokens miss D's prefix cache.
    remote_threshold_tokens: int = 256
    # D: at most this many prefills in flight per P (its capacity as D sees it).
    max_inflight_per_prefill: int = 8
    # D: a P whose queue (waiting requests) is this long counts as full.
    max_prefill_queue: int = 16
    # Lease, D: the push budget sent to P (seconds from D's send; P posts no WRITE after it).
    # P: how long a step waits for its transfer thread before failing those pushes.
    prefill_timeout_s: float = 30.0
    # Lease: D keeps blocks this much longer than the deadline before reusing them.
    lease_grace_s: float = 2.0
    # P: stop posting WRITEs this long before the push budget ends (measured on P's clock from
    # the request's arrival): covers D→P transit and the last WRITEs' flight (docs/architecture.md,
    # "Lease and quarantine"). Must be smaller than the budget D gives (its prefill_timeout_s).
    push_stop_margin_s: float = 2.0
    # D: seconds between health checks of each P; a failed P is retried after retry_after_s.
    health_interval_s: float = 2.0
    retry_after_s: float = 10.0
    # D: this many consecutive failures of a P (do_prefill or health check) open its circuit
    # breaker; after retry_after_s one trial request may close it again (pdpush.policy).
    breaker_failures: int = 3
    # D: what a failed remote prefill becomes: a local prefill, or an error for the client.
    on_failure: Literal["local", "error"] = "local"
    # D: what a greedy first token of P that differs from D's does (plain greedy, remote only):
    # log | exclude-from-cache (the request's pushed blocks leave D's prefix cache) | error
    # (exclude-from-cache, the P counts one failure, the response carries an error).
    on_first_token_mismatch: str = "log"
    # D, tests only: honour kv_transfer_params.pdpush_prefill_tokens (P computes other tokens
    # than the prompt; the must-fail control). Refused unless PDPUSH_TEST_MODE=1 in D's
    # environment; such requests must carry a cache_salt and their blocks are kept out of D's
    # prefix cache (docs/architecture.md, "Decisions and outcomes").
    test_allow_prefill_tokens: bool = False
    # D: worker rank r serves its NIXL metadata on side_channel_host:side_channel_port + r
    # (the address it binds: 0.0.0.0 for every interface).
    side_channel_host: str = "127.0.0.1"
    side_channel_port: int = 5600
    # D: the address its Ps reach the side channel at (sent in the push target). Empty: the
    # side_channel_host if that is one address, else the local address that routes to the Ps.
    advertise_host: str = ""
    # Both: serve live connector stats (free KV blocks, decisions, fallbacks) as JSON on
    # stats_host:stats_port/stats (and Prometheus text on /metrics) from the scheduler; 0 = off.
    stats_host: str = "127.0.0.1"
    stats_port: int = 0
    # Both: the shared key that signs push targets and P's notifications (connector/auth.py):
    # a file holding it, or the name of an environment variable holding it; never the key.
    auth_key_file: str = ""
    auth_key_env: str = ""
    # P: how long P waits for D's side channel before giving up on a request.
    side_channel_timeout_s: float = 5.0
    # Tests only: a directory of fault triggers (connector/faults.py); refused unless the
    # environment has PDPUSH_FAULT_HOOKS=1.
    fault_hooks_dir: str = ""
    # Test only (PDPUSH_TEST_MODE=1), D: serve /kv_digest (per-layer hashes of KV blocks) on the side channel.
    debug_kv_digest: bool = False
    # D: the step probe; off unless it names a log or a metrics endpoint.
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    # Test only (PDPUSH_TEST_MODE=1), P: post each layer's WRITE without waiting for its CUDA
    # event, i.e. break the sender ordering rule, so an ordering test has a control that can fail.
    debug_skip_layer_event: bool = False
    # Test only (PDPUSH_TEST_MODE=1), P: hold the forward stream this many microseconds before
    # each layer's KV write (a GPU sleep kernel), so a WRITE posted too early ships stale bytes.
    debug_delay_layer_us: int = 0

    @classmethod
    def from_extra_config(cls, extra: dict[str, Any] | None, role: str) -> "PdpushConfig":
        """Parse and validate; `role` is vLLM's kv_role (kv_consumer = D, kv_producer = P)."""
        extra = dict(extra or {})
        probe = ProbeConfig.from_extra(extra)
        extra = {k: v for k, v in extra.items() if k != "probe" and not k.startswith("probe_")}
        known = {f.name: f for f in dataclasses.fields(cls) if f.name != "probe"}
        unknown = sorted(set(extra) - set(known))
        if unknown:
            raise ConfigError(
                f"pdpush: unknown kv_connector_extra_config key(s) {unknown}; "
                f"known: {sorted([*known, 'probe'])}"
            )
        values = {name: _coerce(name, known[name].type, value) for name, value in extra.items()}
        config = cls(**values, probe=probe)
        config.validate(role)
        return config

    def validate(self, role: str) -> None:
        """Reject values that cannot work; one message per problem, naming the key."""
        if role not in (DECODE_ROLE, PREFILL_ROLE):
            raise ConfigError(f"pdpush: kv_role must be kv_consumer (D) or kv_producer (P), not {role!r}")
        positive = ("max_inflight_per_prefill", "max_prefill_queue", "prefill_timeout_s",
                    "health_interval_s", "retry_after_s", "side_channel_timeout_s",
                    "breaker_failures")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"pdpush: {name} must be > 0, got {getattr(self, name)}")
        if self.remote_threshold_tokens < 1:
            raise ConfigError("pdpush: remote_threshold_tokens must be >= 1")
        if self.lease_grace_s < 0:
            raise ConfigError("pdpush: lease_grace_s must be >= 0")
        if not 0 <= self.push_stop_margin_s < self.prefill_timeout_s:
            raise ConfigError(f"pdpush: push_stop_margin_s must be >= 0 and below prefill_timeout_s "
                              f"({self.prefill_timeout_s}), got {self.push_stop_margin_s}")
        if self.fault_hooks_dir and not fault_hooks_allowed():
            raise ConfigError(f"pdpush: fault_hooks_dir is a test seam; it is refused unless "
                              f"{FAULT_HOOKS_ENV}=1 is set in the engine's environment")
        if self.on_failure not in ON_FAILURE:
            raise ConfigError(f"pdpush: on_failure must be one of {ON_FAILURE}, got {self.on_failure!r}")
        if self.on_first_token_mismatch not in ON_FIRST_TOKEN_MISMATCH:
            raise ConfigError(f"pdpush: on_first_token_mismatch must be one of "
                              f"{ON_FIRST_TOKEN_MISMATCH}, got {self.on_first_token_mismatch!r}")
        for name in ("side_channel_port", "stats_port"):
            port = getattr(self, name)
            if not (0 <= port < 65536 and (port or name == "stats_port")):
                raise ConfigError(f"pdpush: {name} out of range: {port}")
        for url in self.prefill_urls:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"pdpush: prefill_urls entries must be http(s) URLs, got {url!r}")
        if role == DECODE_ROLE and not self.prefill_urls:
            raise ConfigError("pdpush: D (kv_consumer) needs at least one entry in prefill_urls")
        if role == PREFILL_ROLE and self.prefill_urls:
            raise ConfigError("pdpush: prefill_urls is D's setting (kv_consumer); P takes none")
        if self.debug_delay_layer_us < 0:
            raise ConfigError("pdpush: debug_delay_layer_us must be >= 0")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        test_only = [k for k in TEST_ONLY_KEYS if getattr(self, k) != defaults[k]]
        if test_only:
            require_test_mode(test_only)
        self.keys()

    def keys(self) -> Keys | None:
        """The shared key(s) named by auth_key_file / auth_key_env, None when unauthenticated."""
        try:
            return load_keys(self.auth_key_file, self.auth_key_env)
        except AuthError as exc:
            raise ConfigError(str(exc)) from exc

    def check_served(self, role: str) -> None:
        """At engine start on D: the Ps must be able to reach and trust this D (network.py)."""
        if role != DECODE_ROLE:
            return
        remote = [url for url in self.prefill_urls if not is_local_host(url_host(url))]
        if remote and self.keys() is None:
            raise ConfigError(f"pdpush: P {remote[0]} is not on this host and no shared key is "
                              "set: give auth_key_file or auth_key_env (on D and every P)")
        host = self.side_channel_address()
        if remote and is_loopback(host):
            raise ConfigError(f"pdpush: D would tell P {remote[0]} to reach its side channel at "
                              f"{host}, a loopback address: set advertise_host (and "
                              "side_channel_host) to an address the Ps can reach")

    def side_channel_address(self) -> str:
        """The host D's push targets name for its side channel (advertise_host, or detected)."""
        if self.advertise_host:
            return self.advertise_host
        if self.side_channel_host not in ("0.0.0.0", "::", ""):
            return self.side_channel_host
        return detect_address([url_host(url) for url in self.prefill_urls])

    def policy_config(self) -> PolicyConfig:
        return PolicyConfig(self.remote_threshold_tokens, self.max_inflight_per_prefill,
                            self.max_prefill_queue, self.retry_after_s, self.breaker_failures)

    @staticmethod
    def is_decode_extra(extra: dict[str, Any] | None) -> bool:
        """D or P from the extra config alone, for the one vLLM hook that gets nothing else
        (`requires_piecewise_for_cudagraph`): validation makes prefill_urls D-only."""
        return bool((extra or {}).get("prefill_urls"))


def test_mode() -> bool:
    """True when this process may accept test-only settings (TEST_MODE_ENV is "1")."""
    return os.environ.get(TEST_MODE_ENV) == "1"


def require_test_mode(what: list[str]) -> None:
    """Refuse test-only settings in a served config: they exist to make a test's control fail."""
    if not test_mode():
        raise ConfigError(f"pdpush: {', '.join(what)}: test-only setting(s), refused unless "
                          f"{TEST_MODE_ENV}=1 is set in the engine's environment")


def _coerce(name: str, annotation: str, value: Any) -> Any:
    """Check one value against its annotation (strings: `from __future__ import annotations`)."""
    if annotation.startswith("tuple"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"pdpush: {name} must be a list of strings, got {value!r}")
        return tuple(v.rstrip("/") for v in value)
    if annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"pdpush: {name} must be true or false, got {value!r}")
        return value
    if annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"pdpush: {name} must be an integer, got {value!r}")
        return value
    if annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"pdpush: {name} must be a number, got {value!r}")
        return float(value)
    if not isinstance(value, str):
        raise ConfigError(f"pdpush: {name} must be a string, got {value!r}")
    return value


def _kv_config(role: str, failure_policy: str, extra: dict[str, Any]) -> dict[str, Any]:
    PdpushConfig.from_extra_config(extra, role)  # fail here, not in the engine
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": MODULE_PATH,
        "kv_role": role,
        "kv_load_failure_policy": failure_policy,
        "kv_connector_extra_config": extra,
    }


def decode_kv_config(prefill_urls: list[str] | tuple[str, ...], **opts: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` of a D that sends long prefills to `prefill_urls`.

    `opts` are PdpushConfig fields (e.g. remote_threshold_tokens=64). A failed remote
    prefill is recomputed on D unless on_failure="error".
    """
    extra = {"prefill_urls": list(prefill_urls), **opts}
    policy = "fail" if opts.get("on_failure") == "error" else "recompute"
    return _kv_config(DECODE_ROLE, policy, extra)


def prefill_kv_config(**opts: Any) -> dict[str, Any]:
    """The `--kv-transfer-config` of a P that pushes the KV of each prefill into its D."""
    return _kv_config(PREFILL_ROLE, "fail", dict(opts))
