"""sysfs source: ROOT/class/infiniband/DEV/ports/N/{counters,hw_counters}/*.

The root is configurable because containers often mount the host's sysfs elsewhere. The IB port
counters `port_rcv_data` and `port_xmit_data` count 4-byte words (IBTA PortCounters); they are
returned in bytes so that both sources give the same numbers for the same name."""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from pdpush.rdma.errors import DeviceGone, PermissionDenied, RdmaError

log = logging.getLogger(__name__)

WORD_COUNTERS = frozenset({"port_rcv_data", "port_xmit_data"})
SUBDIRS = ("counters", "hw_counters")
NOT_COUNTERS = frozenset({"lifespan"})  # hw_counters/lifespan is the cache lifetime setting


@dataclass(frozen=True)
class SysfsPort:
    device: str
    port: int
    path: Path
    driver: str | None  # basename of DEV/device/driver, e.g. mlx5_core, efa, erdma


def _driver(device_dir: Path) -> str | None:
    link = device_dir / "device" / "driver"
    return os.path.basename(os.path.realpath(link)) if link.exists() else None


def _denied(path: Path) -> PermissionDenied:
    return PermissionDenied(f"permission denied reading {path}")


def _gone(port: SysfsPort, path: Path) -> DeviceGone:
    return DeviceGone(f"{port.device}/{port.port} disappeared ({path} is gone)")


class SysfsSource:
    """Enumerates ports and reads their counters below `root` (default /sys)."""

    def __init__(self, root: str | os.PathLike = "/sys"):
        self.root = Path(root)
        self.base = self.root / "class" / "infiniband"

    def ports(self) -> list[SysfsPort]:
        """Every (device, port); empty when the kernel has no RDMA devices (or no RDMA at all)."""
        try:
            devices = sorted(self.base.iterdir()) if self.base.is_dir() else []
        except PermissionError:
            raise _denied(self.base) from None
        out = []
        for dev in devices:
            ports_dir = dev / "ports"
            try:
                numbers = sorted(int(p) for p in os.listdir(ports_dir) if p.isdigit())
            except FileNotFoundError:  # went away while we listed it
                log.debug("skipping %s: no ports directory", dev)
                continue
            except PermissionError:
                raise _denied(ports_dir) from None
            driver = _driver(dev)
            out.extend(SysfsPort(dev.name, n, ports_dir / str(n), driver) for n in numbers)
        return out

    def read(self, port: SysfsPort) -> dict[str, int]:
        """All counters of one port; sysfs word counters converted to bytes."""
        counters: dict[str, int] = {}
        for sub in SUBDIRS:
            directory = port.path / sub
            try:
                names = os.listdir(directory)
            except FileNotFoundError:
                if not port.path.exists():
                    raise _gone(port, port.path) from None
                continue  # a device may have only one of the two directories
            except PermissionError:
                raise _denied(directory) from None
            for name in names:
                if name in NOT_COUNTERS:
                    continue
                value = _read_int(directory / name, port)
                if value is not None:
                    counters[name] = value * 4 if name in WORD_COUNTERS else value
        return counters


def _read_int(path: Path, port: SysfsPort) -> int | None:
    """One counter file; None for files that are not counters or that the driver cannot read."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except PermissionError:
        raise _denied(path) from None
    except FileNotFoundError:
        raise _gone(port, path) from None
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP, errno.EIO, errno.ENODATA):
            log.debug("unreadable counter %s: %s", path, exc.strerror)
            return None
        raise RdmaError(f"cannot read {path}: {exc.strerror}") from None
    try:
        return int(text)
    except ValueError:
        log.debug("not a counter: %s", path)
        return None
