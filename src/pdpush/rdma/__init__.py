"""RDMA hardware counters, read correctly (u64) from NETLINK_RDMA or sysfs.

Library API (what the decode step probe uses)::

    from pdpush.rdma import RdmaCounterReader, RateSampler

    reader = RdmaCounterReader(source="auto", sysfs_root="/sys")  # or devices=["mlx5_0"]
    samples = reader.read()          # list[PortCounters]: device, port, counters, timestamp
    totals = reader.rx_tx_totals()   # {"rx_bytes", "rx_packets", "tx_bytes", "tx_packets"}
    rates = RateSampler().update(samples)  # per-counter rates between successive samples

- `read()` costs one STAT_GET round trip per (device, port) on a persistent socket (see
  `pdpush bench rdma`); ports are enumerated once, so create the reader once and keep it.
- `rx_tx_totals()` sums over the ports read, picking counter names per driver from
  `DRIVER_TABLE` (erdma with and without `hw_`, mlx5, efa, irdma, IB port counters); pass
  your own table to override. Per port: `pdpush.rdma.counters.rx_tx_totals(sample)`.
- Errors are `RdmaError` subclasses with one-line messages: `NetlinkUnavailable`,
  `PermissionDenied`, `DeviceGone` (call `reader.refresh()`), `KernelError`, `MalformedMessage`.
- Lower level: `pdpush.rdma.netlink.RdmaNetlink` / `AsyncRdmaNetlink` (devices, ports, stat),
  the message classes in `pdpush.rdma.messages`, and `pdpush.rdma.sysfs.SysfsSource`.
"""

from pdpush.rdma.counters import (
    DRIVER_TABLE,
    PortCounters,
    PortRates,
    RateSampler,
    rx_tx_totals,
    traffic_rates,
)
from pdpush.rdma.errors import (
    DeviceGone,
    KernelError,
    MalformedMessage,
    NetlinkUnavailable,
    PermissionDenied,
    RdmaError,
)
from pdpush.rdma.reader import RdmaCounterReader

__all__ = [
    "DRIVER_TABLE",
    "DeviceGone",
    "KernelError",
    "MalformedMessage",
    "NetlinkUnavailable",
    "PermissionDenied",
    "PortCounters",
    "PortRates",
    "RateSampler",
    "RdmaCounterReader",
    "RdmaError",
    "rx_tx_totals",
    "traffic_rates",
]
