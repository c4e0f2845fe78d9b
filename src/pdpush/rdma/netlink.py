"""NETLINK_RDMA (NLDEV) client: enumerate RDMA devices and ports, read their u64 hardware counters.

Why netlink: `rdma statistic` of iproute2 v5.5-v5.16 printed these 64-bit counters cut to 32 bits;
the kernel sends them as u64 (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE).

Message layouts are pyroute2 declarative classes (`NldevMessage`), made strict: an attribute whose
length runs past its parent or does not fit its type raises `MalformedMessage` instead of being
read out of the neighbouring bytes. The socket is our own persistent datagram socket (one
`send` + one `recv` per STAT_GET) because the decode step probe calls this every step; the sync
(`RdmaNetlink`) and async (`AsyncRdmaNetlink`) clients share all encoding and parsing.

Constants: the kernel's include/uapi/rdma/rdma_netlink.h (enum rdma_nldev_command,
enum rdma_nldev_attr, RDMA_NL_GET_TYPE), whose attribute enum is ABI ("don't change the order").
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from pyroute2.netlink import NLA_F_NESTED, NLA_F_NET_BYTEORDER, NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST, nla, nlmsg

from pdpush.rdma.errors import (
    KernelError,
    MalformedMessage,
    NetlinkUnavailable,
    PermissionDenied,
    RdmaError,
)

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
_ERRNO = struct.Struct("=i")
_NLA_LEN = struct.Struct("=H")
_NLA_HDR = struct.Struct("=HH")
_NLA_TYPE_MASK = ~(NLA_F_NESTED | NLA_F_NET_BYTEORDER) & 0xFFFF
_U64 = struct.Struct("=Q")
RECV_BUFFER = 65536


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
        (declared,) = _NLA_LEN.unpack_from(self.data, self.offset)
        # self.length is the space the parent left for this attribute
        if declared < 4 or declared > self.length:
            raise MalformedMessage(
                f"netlink attribute claims {declared} bytes, {self.length} remain in its parent"
            )
        if self.payload_size is not None and declared != 4 + self.payload_size:
            raise MalformedMessage(
                f"netlink attribute of {declared - 4} bytes where {self.payload_size} expected"
            )
        self.length = declared


def _attr_at(data: bytes, start: int, end: int) -> tuple[int, int, int]:
    """(type without NLA_F_* flags, payload end, next attribute) of the attribute at `start`."""
    length, atype = _NLA_HDR.unpack_from(data, start)
    if length < 4 or start + length > end:
        raise MalformedMessage(f"netlink attribute claims {length} bytes, {end - start} remain in its parent")
    return atype & _NLA_TYPE_MASK, start + length, start + ((length + 3) & ~3)


def _counter_table(data: bytes, start: int, end: int) -> dict[str, int]:
    """name -> u64 of the RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY nests in [start, end).
    Unknown attributes and PAD are skipped at both levels."""
    table: dict[str, int] = {}
    while end - start >= 4:
        atype, entry_end, start_next = _attr_at(data, start, end)
        if atype == RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY:
            name = value = None
            pos = start + 4
            while entry_end - pos >= 4:
                inner, payload_end, pos_next = _attr_at(data, pos, entry_end)
                if inner == RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME:
                    if payload_end <= pos + 4 or data[payload_end - 1] != 0:
                        raise MalformedMessage("hardware counter name without its NUL terminator")
                    name = bytes(data[pos + 4 : payload_end - 1]).decode("utf-8", "replace")
                elif inner == RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE:
                    if payload_end - pos != 12:
                        raise MalformedMessage(f"hardware counter value of {payload_end - pos - 4} bytes, not 8")
                    (value,) = _U64.unpack_from(data, pos + 4)
                pos = pos_next
            if name is None or value is None:
                raise MalformedMessage("hardware counter entry without a name or a value")
            table[name] = value
        start = start_next
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


class _HwCounterEntry(_Checked, _StrictAtoms, nla):
    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = (
        (RDMA_NLDEV_ATTR_PAD, PAD, "none"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME, "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME", "string"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE, "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE", "u64"),
    )


class _HwCounters(_Checked, _StrictAtoms, nla):
    """The counter table. Encoding is declarative; decoding walks the entries with `struct`
    into a plain dict: a generic decode builds ~3 objects per counter (about 1 ms for 50
    counters), too slow for a call made every decode step."""

    __slots__ = ()
    nla_flags = NLA_F_NESTED
    nla_map = (
        (RDMA_NLDEV_ATTR_PAD, PAD, "none"),
        (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY, "RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY", "entry"),
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


def _fields(message: Any) -> dict[str, Any]:
    """Scalar attributes of a reply by name (the kernel sends each at most once)."""
    out: dict[str, Any] = {}
    for name, attr in _attrs(message):
        if name != "RDMA_NLDEV_ATTR_STAT_HWCOUNTERS":
            out[name] = _value(attr, str if name.endswith("_NAME") else int)
    return out


def _required(fields: dict[str, Any], name: str, what: str) -> Any:
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


def error_for(code: int, what: str) -> RdmaError:
    """The typed error for a negative errno the kernel returned."""
    if code in (errno.EPERM, errno.EACCES):
        return PermissionDenied(f"kernel refused {what}: {errno.errorcode[code]} (try as root)")
    return KernelError(code, what)


class _Exchange:
    """One request and the parsing of its reply datagrams, shared by the sync and async I/O."""

    def __init__(self, command: int, seq: int, data: bytes, dump: bool, what: str):
        self.expected_type = nldev_type(command)
        self.seq = seq
        self.data = data
        self.dump = dump
        self.what = what
        self.replies: list[NldevMessage] = []
        self.done = False

    def feed(self, datagram: bytes) -> None:
        for mtype, flags, seq, raw in split_messages(datagram):
            if seq != self.seq or self.done:
                continue  # a late reply to an earlier request that timed out
            if mtype in (NLMSG_ERROR, NLMSG_DONE):
                self._finish(mtype, raw)
            elif mtype == self.expected_type:
                message = NldevMessage(raw)
                message.decode()
                self.replies.append(message)
                self.done = not (self.dump or flags & NLM_F_MULTI)
            elif mtype != NLMSG_NOOP:
                raise MalformedMessage(f"unexpected netlink message type {mtype} in reply to {self.what}")

    def _finish(self, mtype: int, raw: bytes) -> None:
        body = raw[NLMSGHDR.size :]
        if len(body) < _ERRNO.size:
            if mtype == NLMSG_ERROR:
                raise MalformedMessage(f"NLMSG_ERROR of {len(body)} bytes in reply to {self.what}")
            body = b"\0\0\0\0"  # an NLMSG_DONE may come without its status word
        (code,) = _ERRNO.unpack_from(body)
        if code < 0:
            raise error_for(-code, self.what)
        self.done = True


class _NldevClient:
    """Request encoding and reply conversion; subclasses provide `_run(exchange)`."""

    def __init__(self, sock: socket.socket):
        self._sock = sock
        self._seq = 0
        self._templates: dict[tuple, bytearray] = {}

    def _exchange(self, command: int, dump: bool, what: str, **attrs: int) -> _Exchange:
        key = (command, dump, tuple(sorted(attrs.items())))
        data = self._templates.get(key)
        if data is None:
            message = NldevMessage()
            message["header"]["type"] = nldev_type(command)
            message["header"]["flags"] = NLM_F_REQUEST | (NLM_F_DUMP if dump else 0)
            message["attrs"] = [[f"RDMA_NLDEV_ATTR_{k.upper()}", v] for k, v in attrs.items()]
            message.encode()
            data = self._templates[key] = message.data
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        struct.pack_into("=I", data, 8, self._seq)  # only the sequence number differs
        return _Exchange(command, self._seq, bytes(data), dump, what)

    def _devices_exchange(self) -> _Exchange:
        return self._exchange(RDMA_NLDEV_CMD_GET, True, "the device dump (RDMA_NLDEV_CMD_GET)")

    def _ports_exchange(self, dev_index: int) -> _Exchange:
        what = f"the port dump of device {dev_index} (RDMA_NLDEV_CMD_PORT_GET)"
        return self._exchange(RDMA_NLDEV_CMD_PORT_GET, True, what, dev_index=dev_index)

    def _stat_exchange(self, dev_index: int, port: int) -> _Exchange:
        what = f"STAT_GET of device {dev_index} port {port}"
        return self._exchange(
            RDMA_NLDEV_CMD_STAT_GET, False, what, dev_index=dev_index, port_index=port
        )

    @staticmethod
    def _devices(exchange: _Exchange) -> list[NlDevice]:
        out = []
        for message in exchange.replies:
            f = _fields(message)
            out.append(
                NlDevice(
                    index=_required(f, "RDMA_NLDEV_ATTR_DEV_INDEX", exchange.what),
                    name=_required(f, "RDMA_NLDEV_ATTR_DEV_NAME", exchange.what),
                    num_ports=f.get("RDMA_NLDEV_ATTR_PORT_INDEX", 0),
                )
            )
        return out

    @staticmethod
    def _ports(exchange: _Exchange) -> list[NlPort]:
        out = []
        for message in exchange.replies:
            f = _fields(message)
            out.append(
                NlPort(
                    dev_index=_required(f, "RDMA_NLDEV_ATTR_DEV_INDEX", exchange.what),
                    dev_name=_required(f, "RDMA_NLDEV_ATTR_DEV_NAME", exchange.what),
                    port=_required(f, "RDMA_NLDEV_ATTR_PORT_INDEX", exchange.what),
                    netdev=f.get("RDMA_NLDEV_ATTR_NDEV_NAME"),
                )
            )
        return out

    @staticmethod
    def _stat(exchange: _Exchange, dev_index: int, port: int) -> dict[str, int]:
        if len(exchange.replies) != 1:
            raise MalformedMessage(f"{len(exchange.replies)} replies to {exchange.what}")
        message = exchange.replies[0]
        f = _fields(message)
        got = (f.get("RDMA_NLDEV_ATTR_DEV_INDEX"), f.get("RDMA_NLDEV_ATTR_PORT_INDEX"))
        if got != (dev_index, port):
            raise MalformedMessage(f"reply to {exchange.what} is about device {got[0]} port {got[1]}")
        return hw_counters(message)

    def close(self) -> None:
        self._sock.close()


def open_netlink_socket() -> socket.socket:
    """A NETLINK_RDMA socket bound to a kernel-chosen port id and connected to the kernel."""
    try:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_RDMA)
    except OSError as exc:
        if exc.errno == errno.EPROTONOSUPPORT:
            raise NetlinkUnavailable(
                "this kernel has no RDMA netlink (NETLINK_RDMA socket: EPROTONOSUPPORT; "
                "CONFIG_INFINIBAND unset or ib_core not loaded)"
            ) from None
        if exc.errno in (errno.EPERM, errno.EACCES):
            raise PermissionDenied(f"cannot open a NETLINK_RDMA socket: {exc.strerror}") from None
        raise RdmaError(f"cannot open a NETLINK_RDMA socket: {exc.strerror}") from None
    sock.bind((0, 0))
    sock.connect((0, 0))
    return sock


class RdmaNetlink(_NldevClient):
    """Blocking client on one persistent socket; not thread-safe (use one per thread)."""

    def __init__(self, sock: socket.socket | None = None, timeout: float = 2.0):
        super().__init__(sock if sock is not None else open_netlink_socket())
        self._sock.settimeout(timeout)
        self._timeout = timeout
        self._buffer = bytearray(RECV_BUFFER)

    def __enter__(self) -> RdmaNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, exchange: _Exchange) -> _Exchange:
        try:
            self._sock.send(exchange.data)
            while not exchange.done:
                n = self._sock.recv_into(self._buffer)
                exchange.feed(memoryview(self._buffer)[:n])
        except TimeoutError:
            raise RdmaError(f"no reply to {exchange.what} within {self._timeout:g} s") from None
        except OSError as exc:
            raise RdmaError(f"netlink I/O failed during {exchange.what}: {exc.strerror}") from None
        return exchange

    def devices(self) -> list[NlDevice]:
        return self._devices(self._run(self._devices_exchange()))

    def ports(self, dev_index: int) -> list[NlPort]:
        return self._ports(self._run(self._ports_exchange(dev_index)))

    def stat(self, dev_index: int, port: int) -> dict[str, int]:
        return self._stat(self._run(self._stat_exchange(dev_index, port)), dev_index, port)


class AsyncRdmaNetlink(_NldevClient):
    """asyncio client on one persistent non-blocking socket; one request at a time."""

    def __init__(self, sock: socket.socket | None = None, timeout: float = 2.0):
        super().__init__(sock if sock is not None else open_netlink_socket())
        self._sock.setblocking(False)
        self._timeout = timeout
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> AsyncRdmaNetlink:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    async def _io(self, exchange: _Exchange) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_sendall(self._sock, exchange.data)
        while not exchange.done:
            exchange.feed(await loop.sock_recv(self._sock, RECV_BUFFER))

    async def _run(self, exchange: _Exchange) -> _Exchange:
        async with self._lock:
            try:
                await asyncio.wait_for(self._io(exchange), self._timeout)
            except TimeoutError:
                raise RdmaError(f"no reply to {exchange.what} within {self._timeout:g} s") from None
            except OSError as exc:
                raise RdmaError(f"netlink I/O failed during {exchange.what}: {exc.strerror}") from None
        return exchange

    async def devices(self) -> list[NlDevice]:
        return self._devices(await self._run(self._devices_exchange()))

    async def ports(self, dev_index: int) -> list[NlPort]:
        return self._ports(await self._run(self._ports_exchange(dev_index)))

    async def stat(self, dev_index: int, port: int) -> dict[str, int]:
        return self._stat(await self._run(self._stat_exchange(dev_index, port)), dev_index, port)
