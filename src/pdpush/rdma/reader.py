"""`RdmaCounterReader`: one object that picks a source, enumerates the ports once and then
reads them cheaply, for the CLI and for the decode step probe (which reads every step)."""

from __future__ import annotations

import errno
import logging
import time
from dataclasses import dataclass
from typing import Iterable, Mapping

from pdpush.rdma.counters import DRIVER_TABLE, QUANTITIES, PortCounters, TrafficNames, rx_tx_totals
from pdpush.rdma.errors import (
    DeviceGone,
    KernelError,
    NetlinkUnavailable,
    PermissionDenied,
    RdmaError,
)
from pdpush.rdma.sysfs import SysfsSource

log = logging.getLogger(__name__)

SOURCES = ("auto", "netlink", "sysfs")


@dataclass(frozen=True)
class _Target:
    """One port to read: its names plus what the source needs to address it."""

    device: str
    port: int
    handle: object  # netlink: the device index; sysfs: the SysfsPort
    driver: str | None


class RdmaCounterReader:
    """Reads the hardware counters of every (device, port), or of the `devices` given.

    source "auto" uses netlink and falls back to sysfs when the kernel has no RDMA netlink
    (or refuses us); `fallback_reason` then says why. The port list is enumerated on the first
    `read()`; a port that vanishes later raises `DeviceGone` (call `refresh()` to re-enumerate).
    """

    def __init__(
        self,
        source: str = "auto",
        sysfs_root: str = "/sys",
        devices: Iterable[str] = (),
        timeout: float = 2.0,
        netlink: object | None = None,
    ):
        if source not in SOURCES:
            raise RdmaError(f"unknown source {source!r}; choose one of {', '.join(SOURCES)}")
        self.devices = set(devices)
        self.fallback_reason: str | None = None
        self._sysfs = SysfsSource(sysfs_root)
        self._netlink = netlink
        if source != "sysfs" and netlink is None:
            self._netlink = self._open_netlink(source, timeout)
        self.source = "netlink" if self._netlink is not None else "sysfs"
        self._targets: list[_Target] | None = None

    def _open_netlink(self, source: str, timeout: float):
        from pdpush.rdma.netlink import RdmaNetlink  # pyroute2 only when netlink is used

        try:
            return RdmaNetlink(timeout=timeout)
        except (NetlinkUnavailable, PermissionDenied) as exc:
            if source == "netlink":
                raise
            self.fallback_reason = str(exc)
            return None

    def __enter__(self) -> RdmaCounterReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._netlink is not None:
            self._netlink.close()

    def refresh(self) -> None:
        """Enumerate the ports again (after `DeviceGone`, or to see new devices)."""
        self._targets = None

    def _enumerate(self) -> list[_Target]:
        if self._netlink is not None:
            targets = [
                _Target(p.dev_name, p.port, p.dev_index, None)
                for d in self._netlink.devices()
                for p in self._netlink.ports(d.index)
            ]
        else:
            targets = [_Target(p.device, p.port, p, p.driver) for p in self._sysfs.ports()]
        return [t for t in targets if not self.devices or t.device in self.devices]

    def ports(self) -> list[tuple[str, int]]:
        if self._targets is None:
            self._targets = self._enumerate()
        return [(t.device, t.port) for t in self._targets]

    def read(self) -> list[PortCounters]:
        """One sample of every port; empty when there are no RDMA devices."""
        self.ports()
        return [self._read_one(t) for t in self._targets]

    def _read_one(self, target: _Target) -> PortCounters:
        if self._netlink is None:
            counters = self._sysfs.read(target.handle)
        else:
            try:
                counters = self._netlink.stat(target.handle, target.port)
            except KernelError as exc:
                counters = self._after_error(target, exc)
        now = time.monotonic()
        return PortCounters(target.device, target.port, counters, self.source, now, target.driver)

    def _after_error(self, target: _Target, exc: KernelError) -> dict[str, int]:
        """The kernel answers EINVAL/ENODEV for a device index it no longer knows, and
        EINVAL/EOPNOTSUPP for a port without hardware counters (no rdma_hw_stats)."""
        if exc.errno not in (errno.EINVAL, errno.ENODEV, errno.EOPNOTSUPP):
            raise exc
        if not self._still_there(target):
            raise DeviceGone(f"{target.device}/{target.port} disappeared between samples") from None
        if exc.errno == errno.ENODEV:
            raise exc
        log.debug("%s/%d has no hardware counters: %s", target.device, target.port, exc)
        return {}

    def _still_there(self, target: _Target) -> bool:
        return any(
            (t.device, t.port, t.handle) == (target.device, target.port, target.handle)
            for t in self._enumerate()
        )

    def rx_tx_totals(self, table: Mapping[str, TrafficNames] = DRIVER_TABLE) -> dict[str, int | None]:
        """RX/TX bytes and packets summed over the ports read (None: no port has that counter)."""
        totals: dict[str, int | None] = dict.fromkeys(QUANTITIES)
        for sample in self.read():
            for q, value in rx_tx_totals(sample, table).items():
                if value is not None:
                    totals[q] = (totals[q] or 0) + value
        return totals
