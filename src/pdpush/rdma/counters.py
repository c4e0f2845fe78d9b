"""The result shape shared by the netlink and sysfs sources, the per-driver table of which
counters carry RX/TX bytes and packets, and the sampler that turns two samples into rates."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Iterable, Mapping

QUANTITIES = ("rx_bytes", "rx_packets", "tx_bytes", "tx_packets")

# quantity -> alternatives, tried in order; an alternative is a tuple of counter names whose
# values are summed (irdma counts IPv4 and IPv6 separately). sysfs `port_*_data` are already
# converted from 4-byte words to bytes by the sysfs source.
TrafficNames = Mapping[str, tuple[tuple[str, ...], ...]]

_IB_PMA: TrafficNames = {  # IB port counters (sysfs counters/), present on every IB/RoCE device
    "rx_bytes": (("port_rcv_data",),),
    "rx_packets": (("port_rcv_packets",),),
    "tx_bytes": (("port_xmit_data",),),
    "tx_packets": (("port_xmit_packets",),),
}

DRIVER_TABLE: dict[str, TrafficNames] = {
    # erdma renamed its counters: hw_rx_bytes_cnt on older kernels, rx_bytes_cnt upstream
    "erdma": {q: ((f"hw_{q}_cnt",), (f"{q}_cnt",)) for q in QUANTITIES},
    # mlx5: optional counters (enabled with `rdma statistic set ... optional-counters`)
    # or the IB port counters
    "mlx5": {q: ((f"rdma_{q}",),) + _IB_PMA[q] for q in QUANTITIES},
    "efa": {
        "rx_bytes": (("rx_bytes",),),
        "rx_packets": (("rx_pkts",),),
        "tx_bytes": (("tx_bytes",),),
        "tx_packets": (("tx_pkts",),),
    },
    "irdma": {
        "rx_bytes": (("ip4InOctets", "ip6InOctets"),),
        "rx_packets": (("ip4InPkts", "ip6InPkts"),),
        "tx_bytes": (("ip4OutOctets", "ip6OutOctets"),),
        "tx_packets": (("ip4OutPkts", "ip6OutPkts"),),
    },
    "ib": _IB_PMA,
}


@dataclass(frozen=True)
class PortCounters:
    """All counters of one (device, port) at one instant, whichever source read them."""

    device: str
    port: int
    counters: dict[str, int]
    source: str  # "netlink" or "sysfs"
    timestamp: float  # time.monotonic() right after the read
    driver: str | None = None  # kernel driver when the source knows it (sysfs)

    @property
    def link(self) -> str:
        return f"{self.device}/{self.port}"


def driver_of(sample: PortCounters, table: Mapping[str, TrafficNames]) -> str | None:
    """The table entry for a port: its known driver, else the device-name prefix (mlx5_0),
    else the first entry whose RX-bytes counter the port has."""
    for hint in (sample.driver, sample.device.rstrip("0123456789").rstrip("_")):
        if hint and hint.split("_")[0] in table:
            return hint.split("_")[0]
    for name, names in table.items():
        if _pick(sample.counters, names.get("rx_bytes", ())) is not None:
            return name
    return None


def _pick(values: Mapping[str, float], alternatives: Iterable[tuple[str, ...]]) -> float | None:
    """The sum of the first alternative whose names are all present (counters or rates)."""
    for names in alternatives:
        if all(n in values for n in names):
            return sum(values[n] for n in names)
    return None


def rx_tx_totals(
    sample: PortCounters, table: Mapping[str, TrafficNames] = DRIVER_TABLE
) -> dict[str, int | None]:
    """rx_bytes, rx_packets, tx_bytes, tx_packets of one port (None where the driver has no
    such counter). Pass your own `table` to override or extend the driver names."""
    names = table.get(driver_of(sample, table) or "", {})
    return {q: _pick(sample.counters, names.get(q, ())) for q in QUANTITIES}


def select(
    samples: Iterable[PortCounters],
    devices: Iterable[str] = (),
    ports: Iterable[int] = (),
    counters: Iterable[str] = (),
) -> list[PortCounters]:
    """Keep the given devices and ports (empty: all) and the counters matching any glob."""
    devices, ports, counters = set(devices), set(ports), list(counters)
    out = []
    for s in samples:
        if (devices and s.device not in devices) or (ports and s.port not in ports):
            continue
        if counters:
            kept = {
                k: v for k, v in s.counters.items() if any(fnmatch.fnmatchcase(k, p) for p in counters)
            }
            s = PortCounters(s.device, s.port, kept, s.source, s.timestamp, s.driver)
        out.append(s)
    return out


@dataclass(frozen=True)
class PortRates:
    """Per-second rates of one port between two samples."""

    device: str
    port: int
    interval_s: float
    rates: dict[str, float]  # counter name -> increase per second
    resets: tuple[str, ...] = ()  # counters that went backwards in this interval

    @property
    def link(self) -> str:
        return f"{self.device}/{self.port}"


@dataclass
class RateSampler:
    """Turns successive samples into rates on the samples' monotonic timestamps.

    A counter lower than before was reset (driver reload, port reset, wrap): as Prometheus
    does, its increase is taken to be its new value, so a rate is never negative."""

    _last: dict[tuple[str, int], PortCounters] = field(default_factory=dict)

    def update(self, samples: Iterable[PortCounters]) -> list[PortRates]:
        out = []
        for s in samples:
            key = (s.device, s.port)
            prev = self._last.get(key)
            self._last[key] = s
            if prev is not None and s.timestamp > prev.timestamp:
                out.append(_rates(prev, s))
        return out


def _rates(prev: PortCounters, cur: PortCounters) -> PortRates:
    dt = cur.timestamp - prev.timestamp
    rates: dict[str, float] = {}
    resets = []
    for name, value in cur.counters.items():
        before = prev.counters.get(name)
        if before is None:
            continue  # a counter that appeared (optional counter enabled): no rate yet
        if value < before:
            resets.append(name)
            rates[name] = value / dt
        else:
            rates[name] = (value - before) / dt
    return PortRates(cur.device, cur.port, dt, rates, tuple(resets))


def traffic_rates(
    rates: PortRates, sample: PortCounters, table: Mapping[str, TrafficNames] = DRIVER_TABLE
) -> dict[str, float | None]:
    """RX/TX bytes and packets per second from per-counter rates, with the driver table."""
    names = table.get(driver_of(sample, table) or "", {})
    return {q: _pick(rates.rates, names.get(q, ())) for q in QUANTITIES}
