"""NETLINK_RDMA (NLDEV) message formats: pyroute2 declarative classes for the requests and
replies of RDMA_NLDEV_CMD_GET, PORT_GET and STAT_GET, plus the framing checks.

The classes are made strict: an attribute whose length runs past its parent or does not fit
its type raises `MalformedMessage` instead of being read out of the neighbouring bytes (pyroute2
itself clamps lengths and logs). PAD (type 0, nla_put_u64_64bit's alignment filler) and
attribute types unknown here are skipped.

Constants: the kernel's include/uapi/rdma/rdma_netlink.h (enum rdma_nldev_command,
enum rdma_nldev_attr, RDMA_NL_GET_TYPE), whose attribute enum is ABI ("don't change the order").
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Iterator

from pyroute2.netlink import NLA_F_NESTED, NLA_F_NET_BYTEORDER, nla, nlmsg

from pdpush.rdma.errors import MalformedMessage

NETLINK_RDMA = 20  # include/uapi/linux/netlink.h
RDMA_NL_NLDEV = 5  # RDMA_NL_RDMA_CM=1, IWCM, RSVD, LS, NLDEV

# enum rdma_nldev_command
RDMA_NLDEV_CMD_GET = 1
RDMA_NLDEV_CMD_PORT_GET = 5
RDMA_NLDEV_CMD_STAT_GET = 17

# enum rdma_nldev_attr
RDMA_NLDEV_ATTR_PAD = 0
RDMA_NLDEV_ATTR_DEV_INDEX = 1
RDMA_NLDEV_ATTR_DEV_NAME = 2
RDMA_NLDEV_ATTR_PORT_INDEX = 3
RDMA_NLDEV_ATTR_PORT_STATE = 12
RDMA_NLDEV_ATTR_NDEV_NAME = 51
RDMA_NLDEV_ATTR_STAT_HWCOUNTERS = 80
RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY = 81
RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME = 82
RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE = 83

# include/uapi/linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLA_HDR = struct.Struct("=HH")
_NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
_U64 = struct.Struct("=Q")


def nldev_type(command: int) -> int:
    """RDMA_NL_GET_TYPE(RDMA_NL_NLDEV, command): the nlmsg_type of requests and replies."""
    return (RDMA_NL_NLDEV << 10) + command


class _Checked:
    """Mixin for pyroute2 attribute classes: check the declared length before decoding."""

    __slots__ = ()
    payload_size: int | None = None  # exact payload bytes of fixed-size types

    def decode(self) -> None:
        self.decode_header()
        super().decode()

    def decode_header(self) -> None:
        # self.length is the space the parent left for this attribute
        _, end, _ = _attr_at(self.data, self.offset, self.offset + self.length)
        declared = end - self.offset
        if self.payload_size is not None and declared != 4 + self.payload_size:
            raise MalformedMessage(
                f"netlink attribute of {declared - 4} bytes where {self.payload_size} expected"
            )
        self.length = declared


def _overrun(claimed: int, remaining: int) -> MalformedMessage:
    return MalformedMessage(
        f"netlink attribute claims {claimed} bytes, {remaining} remain in its parent"
    )


def _attr_at(data: bytes, start: int, end: int) -> tuple[int, int, int]:
    """(type without NLA_F_* flags, payload end, next attribute) of the attribute at `start`."""
    length, atype = _NLA_HDR.unpack_from(data, start)
    if length < 4 or start + length > end:
        raise _overrun(length, end - start)
    return atype & _NLA_TYPE_MASK, start + length, start + ((length + 3) & ~3)


def _counter_table(data: bytes, start: int, end: int) -> dict[str, int]:
    """name -> u64 of the RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY nests in [start, end).
    Unknown attributes and PAD are skipped at both levels. Written as one flat loop (no call
    per attribute): this runs for every counter of every sample."""
    unpack, u64 = _NLA_HDR.unpack_from, _U64.unpack_from
    table: dict[str, int] = {}
    while end - start >= 4:
        length, atype = unpack(data, start)
        if length < 4 or start + length > end:
            raise _overrun(length, end - start)
        entry_end, pos = start + length, start + 4
        start += (length + 3) & ~3
        if atype & _NLA_TYPE_MASK != RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY:
            continue
        name = value = None
        while entry_end - pos >= 4:
            alen, inner = unpack(data, pos)
            if alen < 4 or pos + alen > entry_end:
                raise _overrun(alen, entry_end - pos)
            inner &= _NLA_TYPE_MASK
            if inner == RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME:
                if alen <= 4 or data[pos + alen - 1] != 0:
                    raise MalformedMessage("hardware counter name without its NUL terminator")
                name = data[pos + 4 : pos + alen - 1].decode("utf-8", "replace")
            elif inner == RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE:
                if alen != 12:
                    raise MalformedMessage(f"hardware counter value of {alen - 4} bytes, not 8")
                (value,) = u64(data, pos + 4)
            pos += (alen + 3) & ~3
        if name is None or value is None:
            raise MalformedMessage("hardware counter entry without a name or a value")
        table[name] = value
    return table


class _StrictAtoms:
    """The attribute value types the NLDEV replies use, with length checks (listed before
    pyroute2's own classes in the bases, so that the nla_map type names resolve here)."""

    __slots__ = ()

    class u8(_Checked, nla.uint8):
        __slots__ = ()
        payload_size = 1

    class u32(_Checked, nla.uint32):
        __slots__ = ()
        payload_size = 4

    class u64(_Checked, nla.uint64):
        __slots__ = ()
        payload_size = 8

    class string(_Checked, nla.asciiz):
        __slots__ = ()


PAD = "RDMA_NLDEV_ATTR_PAD"  # 64-bit alignment padding, type 0, skipped on decode
_ENTRY = "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY"


class _HwCounterEntry(_Checked, _StrictAtoms, nla):
    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = (
        (RDMA_NLDEV_ATTR_PAD, PAD, "none"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME, f"{_ENTRY}_NAME", "string"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE, f"{_ENTRY}_VALUE", "u64"),
    )


class _HwCounters(_Checked, _StrictAtoms, nla):
    """The counter table. Encoding is declarative; decoding walks the entries with `struct`
    into a plain dict: a generic decode builds ~3 objects per counter (about 1 ms for 50
    counters), too slow for a call made every decode step."""

    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = (
        (RDMA_NLDEV_ATTR_PAD, PAD, "none"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY, _ENTRY, "entry"),
    )
    entry = _HwCounterEntry

    def decode(self) -> None:
        _Checked.decode_header(self)
        self.value = _counter_table(self.data, self.offset + 4, self.offset + self.length)
        self.decoded = True


class NldevMessage(_StrictAtoms, nlmsg):
    """Requests and replies of GET, PORT_GET and STAT_GET: a bare nlmsghdr plus attributes."""

    __slots__ = ()
    nla_map = (
        (RDMA_NLDEV_ATTR_PAD, PAD, "none"),
        (RDMA_NLDEV_ATTR_DEV_INDEX, "RDMA_NLDEV_ATTR_DEV_INDEX", "u32"),
        (RDMA_NLDEV_ATTR_DEV_NAME, "RDMA_NLDEV_ATTR_DEV_NAME", "string"),
        (RDMA_NLDEV_ATTR_PORT_INDEX, "RDMA_NLDEV_ATTR_PORT_INDEX", "u32"),
        (RDMA_NLDEV_ATTR_PORT_STATE, "RDMA_NLDEV_ATTR_PORT_STATE", "u8"),
        (RDMA_NLDEV_ATTR_NDEV_NAME, "RDMA_NLDEV_ATTR_NDEV_NAME", "string"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTERS, "RDMA_NLDEV_ATTR_STAT_HWCOUNTERS", "hwcounters"),
    )
    hwcounters = _HwCounters


@dataclass(frozen=True)
class NlDevice:
    index: int
    name: str
    num_ports: int  # RDMA_NLDEV_CMD_GET reports the port count in PORT_INDEX


@dataclass(frozen=True)
class NlPort:
    dev_index: int
    dev_name: str
    port: int
    netdev: str | None


def _attrs(container: Any) -> Iterator[tuple[str, Any]]:
    """Decoded (name, attribute) pairs of a message or nest; PAD and unknown types skipped."""
    for slot in container["attrs"]:
        name, attr = slot.cell
        if name in (PAD, "UNKNOWN"):
            continue
        if not attr.decoded:
            try:
                attr.decode()
            except struct.error as exc:
                raise MalformedMessage(f"cannot decode {name}: {exc}") from None
        yield name, attr


def _value(attr: Any, kind: type) -> Any:
    value = attr.getvalue()
    if not isinstance(value, kind):
        raise MalformedMessage(f"netlink attribute holds {value!r}, not {kind.__name__}")
    return value


def scalar_fields(message: Any) -> dict[str, Any]:
    """Scalar attributes of a reply by name (the kernel sends each at most once)."""
    out: dict[str, Any] = {}
    for name, attr in _attrs(message):
        if name != "RDMA_NLDEV_ATTR_STAT_HWCOUNTERS":
            out[name] = _value(attr, str if name.endswith("_NAME") else int)
    return out


def required(fields: dict[str, Any], name: str, what: str) -> Any:
    if name not in fields:
        raise MalformedMessage(f"{what} reply lacks {name}")
    return fields[name]


def hw_counters(message: Any) -> dict[str, int]:
    """The name -> u64 value table of a STAT_GET reply."""
    for name, table in _attrs(message):
        if name == "RDMA_NLDEV_ATTR_STAT_HWCOUNTERS":
            return table.getvalue()
    return {}


def split_messages(datagram: bytes) -> Iterator[tuple[int, int, int, bytes]]:
    """(type, flags, seq, whole message) of each nlmsghdr-framed message in one datagram."""
    offset = 0
    while len(datagram) - offset >= NLMSGHDR.size:
        length, mtype, flags, seq, _pid = NLMSGHDR.unpack_from(datagram, offset)
        if length < NLMSGHDR.size or offset + length > len(datagram):
            raise MalformedMessage(
                f"truncated netlink message: header says {length} bytes, "
                f"{len(datagram) - offset} received"
            )
        yield mtype, flags, seq, bytes(datagram[offset : offset + length])
        offset += (length + 3) & ~3
    if offset < len(datagram):
        raise MalformedMessage(f"{len(datagram) - offset} stray bytes after the last netlink message")
