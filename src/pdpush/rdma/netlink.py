"""NETLINK_RDMA (NLDEV) clients: enumerate RDMA devices and ports, read their u64 counters.

Why netlink: `rdma statistic` of iproute2 v5.5-v5.16 printed these 64-bit counters cut to 32 bits;
the kernel sends them as u64 (RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE).

The socket is our own persistent datagram socket, one `send` + one `recv` per STAT_GET, because
the decode step probe calls this every step: pyroute2's AsyncNetlinkSocket request machinery
costs several times the whole exchange (`pdpush bench rdma` prints both). pyroute2 provides the
message classes (messages.py). The sync (`RdmaNetlink`) and async (`AsyncRdmaNetlink`) clients
share all encoding and parsing (`_NldevClient`, `_Exchange`); only the I/O loop differs.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import struct

from pyroute2.netlink import NLM_F_DUMP, NLM_F_MULTI, NLM_F_REQUEST

from pdpush.rdma.errors import (
    KernelError,
    MalformedMessage,
    NetlinkUnavailable,
    PermissionDenied,
    RdmaError,
)
from pdpush.rdma.messages import (
    NETLINK_RDMA,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSG_NOOP,
    NLMSGHDR,
    RDMA_NLDEV_CMD_GET,
    RDMA_NLDEV_CMD_PORT_GET,
    RDMA_NLDEV_CMD_STAT_GET,
    NldevMessage,
    NlDevice,
    NlPort,
    hw_counters,
    nldev_type,
    required,
    scalar_fields,
    split_messages,
)

_ERRNO = struct.Struct("=i")
RECV_BUFFER = 65536


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
                raise MalformedMessage(f"unexpected message type {mtype} in reply to {self.what}")

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
            message["attrs"] = [[message.name2nla(k), v] for k, v in attrs.items()]
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
    def _records(exchange: _Exchange, make: type, need: dict, maybe: dict) -> list:
        """One `make(**fields)` per reply message; `need` maps a field to the attribute that
        must be present, `maybe` to (attribute, default)."""
        out = []
        for message in exchange.replies:
            f = scalar_fields(message)
            fields = {k: required(f, attr, exchange.what) for k, attr in need.items()}
            fields.update({k: f.get(attr, default) for k, (attr, default) in maybe.items()})
            out.append(make(**fields))
        return out

    def _devices(self, exchange: _Exchange) -> list[NlDevice]:
        need = {"index": "dev_index", "name": "dev_name"}
        # RDMA_NLDEV_CMD_GET reports the number of ports in PORT_INDEX
        return self._records(exchange, NlDevice, need, {"num_ports": ("port_index", 0)})

    def _ports(self, exchange: _Exchange) -> list[NlPort]:
        need = {"dev_index": "dev_index", "dev_name": "dev_name", "port": "port_index"}
        return self._records(exchange, NlPort, need, {"netdev": ("ndev_name", None)})

    @staticmethod
    def _stat(exchange: _Exchange, dev_index: int, port: int) -> dict[str, int]:
        if len(exchange.replies) != 1:
            raise MalformedMessage(f"{len(exchange.replies)} replies to {exchange.what}")
        message = exchange.replies[0]
        f = scalar_fields(message)
        got = (f.get("dev_index"), f.get("port_index"))
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
