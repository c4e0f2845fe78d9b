"""NETLINK_RDMA (NLDEV) message formats: pyroute2 declarative classes for the requests and
replies of RDMA_NLDEV_CMD_GET, PORT_GET and STAT_GET, plus the framing checks.

The classes are made strict: an attribute whose length runs past its parent or does not fit
its type raises `MalformedMessage` instead of being read out of the neighbouring bytes (pyroute2
itself clamps lengths and logs). PAD (type 0, nla_put_u64_64bit's alignment filler) and
attribute types unknown here are skipped.

Constants: the kernel's include/uapi/rdma/rdma_netlink.h (enum rdma_nldev_command,
enum rdma_nldev_attr, RDMA_NL_GET_TYPE), whose attribute enum is ABI ("don't change the order").
Each attribute is declared once, in pyroute2's style: the `nla_map` of the class that holds it
lists (enum value, name without the RDMA_NLDEV_ATTR_ prefix, value type), and pyroute2's
`prefix` converts between full names and short ones ("dev_index", as `scalar_fields` returns).
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

# include/uapi/linux/netlink.h
NLMSG_NOOP, NLMSG_ERROR, NLMSG_DONE = 1, 2, 3

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid (host byte order)
_NLA_HDR = struct.Struct("=HH")
_NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
_U64 = struct.Struct("=Q")

ATTR_PREFIX = "RDMA_NLDEV_ATTR_"  # of every enum rdma_nldev_attr name


def nldev_type(command: int) -> int:
    """RDMA_NL_GET_TYPE(RDMA_NL_NLDEV, command): the nlmsg_type of requests and replies."""
    return (RDMA_NL_NLDEV << 10) + command


def align(length: int) -> int:
    """NLA_ALIGN and NLMSG_ALIGN: attributes and messages start on 4-byte boundaries."""
    return (length + 3) & ~3


def _nla_map(*attrs: tuple[int, str, str]) -> tuple[tuple[int, str, str], ...]:
    """A pyroute2 `nla_map` with explicit type numbers from (enum rdma_nldev_attr value, name
    without ATTR_PREFIX, value type) triples, PAD first: type 0, nla_put_u64_64bit's 64-bit
    alignment filler, which every level may hold and decoding skips."""
    attrs = ((0, "PAD", "none"),) + attrs
    return tuple((num, ATTR_PREFIX + name, kind) for num, name, kind in attrs)


def _overrun(claimed: int, remaining: int) -> MalformedMessage:
    return MalformedMessage(
        f"netlink attribute claims {claimed} bytes, {remaining} remain in its parent"
    )


def _attr_at(data: bytes, start: int, end: int) -> tuple[int, int, int]:
    """(type without NLA_F_* flags, attribute end, next attribute) of the attribute at `start`;
    one that runs past `end` raises."""
    length, atype = _NLA_HDR.unpack_from(data, start)
    if length < 4 or start + length > end:
        raise _overrun(length, end - start)
    return atype & _NLA_TYPE_MASK, start + length, start + align(length)


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


class _Nldev:
    """What every NLDEV class shares: the attribute name prefix (pyroute2's `prefix`, so that
    `name2nla("dev_index")` and `nla2name` convert) and the value types of the replies, with
    length checks (listed before pyroute2's own classes in the bases, so that the nla_map
    type names resolve here)."""

    __slots__ = ()
    prefix = ATTR_PREFIX

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


class _HwCounterEntry(_Checked, _Nldev, nla):
    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = _nla_map(
        (82, "STAT_HWCOUNTER_ENTRY_NAME", "string"),
        (83, "STAT_HWCOUNTER_ENTRY_VALUE", "u64"),
    )


class _HwCounters(_Checked, _Nldev, nla):
    """The counter table. Encoding is declarative; decoding walks the entries with `struct`
    into a plain dict: a generic decode builds ~3 objects per counter (about 1 ms for 50
    counters), too slow for a call made every decode step."""

    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = _nla_map((81, "STAT_HWCOUNTER_ENTRY", "entry"))
    entry = _HwCounterEntry

    def decode(self) -> None:
        _Checked.decode_header(self)
        self.value = _counter_table(self.data, self.offset + 4, self.offset + self.length)
        self.decoded = True


class NldevMessage(_Nldev, nlmsg):
    """Requests and replies of GET, PORT_GET and STAT_GET: a bare nlmsghdr plus attributes."""

    __slots__ = ()
    nla_map = _nla_map(
        (1, "DEV_INDEX", "u32"),
        (2, "DEV_NAME", "string"),
        (3, "PORT_INDEX", "u32"),  # GET: the number of ports; PORT_GET, STAT_GET: the port
        (12, "PORT_STATE", "u8"),
        (51, "NDEV_NAME", "string"),
        (80, "STAT_HWCOUNTERS", "hwcounters"),
    )
    hwcounters = _HwCounters


def _number(cls: type, name: str) -> int:
    """The type number `cls.nla_map` declares for attribute `name` (without the prefix)."""
    return next(num for num, full, _ in cls.nla_map if full == cls.name2nla(name))


_ENTRY = _number(_HwCounters, "stat_hwcounter_entry")
_ENTRY_NAME = _number(_HwCounterEntry, "stat_hwcounter_entry_name")
_ENTRY_VALUE = _number(_HwCounterEntry, "stat_hwcounter_entry_value")
_HWCOUNTERS = NldevMessage.name2nla("stat_hwcounters")
_SKIPPED = (NldevMessage.name2nla("pad"), "UNKNOWN")  # pyroute2 names unknown types UNKNOWN


def _counter_table(data: bytes, start: int, end: int) -> dict[str, int]:
    """name -> u64 of the STAT_HWCOUNTER_ENTRY nests in [start, end), read with `struct`.
    Unknown attributes and PAD are skipped at both levels. One flat loop that does inline what
    `_attr_at` does (no call per attribute but `align`): this runs for every counter of every
    sample."""
    unpack, u64, aligned, mask = _NLA_HDR.unpack_from, _U64.unpack_from, align, _NLA_TYPE_MASK
    entry_type, name_type, value_type = _ENTRY, _ENTRY_NAME, _ENTRY_VALUE
    table: dict[str, int] = {}
    while end - start >= 4:
        length, atype = unpack(data, start)
        entry_end, pos = start + length, start + 4
        if length < 4 or entry_end > end:
            raise _overrun(length, end - start)
        start += aligned(length)
        if atype & mask != entry_type:
            continue
        name = value = None
        while entry_end - pos >= 4:
            alen, inner = unpack(data, pos)
            attr_end = pos + alen
            if alen < 4 or attr_end > entry_end:
                raise _overrun(alen, entry_end - pos)
            inner &= mask
            if inner == name_type:
                if alen == 4 or data[attr_end - 1] != 0:
                    raise MalformedMessage("hardware counter name without its NUL terminator")
                name = data[pos + 4 : attr_end - 1].decode("utf-8", "replace")
            elif inner == value_type:
                if alen != 12:
                    raise MalformedMessage(f"hardware counter value of {alen - 4} bytes, not 8")
                (value,) = u64(data, pos + 4)
            pos += aligned(alen)
        if name is None or value is None:
            raise MalformedMessage("hardware counter entry without a name or a value")
        table[name] = value
    return table


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
        full, attr = slot.cell
        if full in _SKIPPED:
            continue
        if not attr.decoded:
            try:
                attr.decode()
            except struct.error as exc:
                raise MalformedMessage(f"cannot decode {full}: {exc}") from None
        yield full, attr


def _value(attr: Any) -> Any:
    value = attr.getvalue()
    kind = str if isinstance(attr, _Nldev.string) else int
    if not isinstance(value, kind):
        raise MalformedMessage(f"netlink attribute holds {value!r}, not {kind.__name__}")
    return value


def scalar_fields(message: Any) -> dict[str, Any]:
    """Scalar attributes of a reply by short name ("dev_index"); the kernel sends each at
    most once."""
    fields = _attrs(message)
    return {message.nla2name(full): _value(attr) for full, attr in fields if full != _HWCOUNTERS}


def required(fields: dict[str, Any], name: str, what: str) -> Any:
    if name not in fields:
        raise MalformedMessage(f"{what} reply lacks {NldevMessage.name2nla(name)}")
    return fields[name]


def hw_counters(message: Any) -> dict[str, int]:
    """The name -> u64 value table of a STAT_GET reply."""
    for full, table in _attrs(message):
        if full == _HWCOUNTERS:
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
        offset += align(length)
    if offset < len(datagram):
        raise MalformedMessage(f"{len(datagram) - offset} stray bytes after the last netlink message")
