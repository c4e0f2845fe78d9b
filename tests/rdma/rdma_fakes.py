"""Kernel-format NETLINK_RDMA replies built byte by byte with `struct`, independently of
pdpush's decoder, and a fake kernel answering on a socketpair so the real socket and decoding
path of the reader runs.

Numbers are written out from include/uapi/rdma/rdma_netlink.h and include/uapi/linux/netlink.h
on purpose (not imported from pdpush), so a wrong constant in pdpush makes a test fail."""

from __future__ import annotations

import errno
import socket
import struct
import threading
from dataclasses import dataclass, field
from typing import Callable

# nlmsg_type = RDMA_NL_GET_TYPE(RDMA_NL_NLDEV=5, op) = (5 << 10) + op
TYPE_GET, TYPE_PORT_GET, TYPE_STAT_GET = 5 * 1024 + 1, 5 * 1024 + 5, 5 * 1024 + 17
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_DUMP = 0x1, 0x2, 0x300
NESTED = 0x8000
A_PAD, A_DEV_INDEX, A_DEV_NAME, A_PORT_INDEX = 0, 1, 2, 3
A_CAP_FLAGS, A_FW_VERSION, A_NODE_GUID, A_PORT_STATE, A_NDEV_NAME = 4, 5, 6, 12, 51
A_HWCOUNTERS, A_HWC_ENTRY, A_HWC_NAME, A_HWC_VALUE = 80, 81, 82, 83
A_HWC_INDEX = 94  # RDMA_NLDEV_ATTR_STAT_HWCOUNTER_INDEX: not in the reader's table


def attr(atype: int, payload: bytes, nested: bool = False) -> bytes:
    """struct nlattr + payload, padded to 4 bytes (NLA_ALIGN)."""
    head = struct.pack("=HH", 4 + len(payload), atype | (NESTED if nested else 0))
    return head + payload + b"\0" * (-len(payload) % 4)


def u8(atype: int, v: int) -> bytes:
    return attr(atype, struct.pack("=B", v))


def u32(atype: int, v: int) -> bytes:
    return attr(atype, struct.pack("=I", v))


def u64(atype: int, v: int, pad: bool = False) -> bytes:
    """nla_put_u64_64bit: a 4-byte PAD attribute first where the kernel needs 8-byte alignment."""
    return (attr(A_PAD, b"") if pad else b"") + attr(atype, struct.pack("=Q", v))


def string(atype: int, s: str) -> bytes:
    return attr(atype, s.encode() + b"\0")


def message(mtype: int, seq: int, payload: bytes, flags: int = 0, pid: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), mtype, flags, seq, pid) + payload


def error(seq: int, code: int, request: bytes = b"\0" * 16) -> bytes:
    """NLMSG_ERROR: int error (negative errno) + the request's header."""
    return message(NLMSG_ERROR, seq, struct.pack("=i", -code) + request[:16])


def done(seq: int) -> bytes:
    return message(NLMSG_DONE, seq, struct.pack("=i", 0), NLM_F_MULTI)


def hw_entry(name: str, value: int, pad: bool = True, extra: bytes = b"") -> bytes:
    """One counter; `extra` attributes go between the name and the value."""
    payload = string(A_HWC_NAME, name) + extra + u64(A_HWC_VALUE, value, pad)
    return attr(A_HWC_ENTRY, payload, nested=True)


def stat_reply(seq: int, index: int, name: str, port: int, counters: dict[str, int], pad: bool = True) -> bytes:
    """The reply to STAT_GET (stat_get_doit_default_counter): handle, port, counter table."""
    table = b"".join(hw_entry(k, v, pad) for k, v in counters.items())
    body = u32(A_DEV_INDEX, index) + string(A_DEV_NAME, name) + u32(A_PORT_INDEX, port)
    return message(TYPE_STAT_GET, seq, body + attr(A_HWCOUNTERS, table, nested=True))


def device_reply(seq: int, index: int, name: str, num_ports: int) -> bytes:
    """One message of the GET dump, with attributes the reader does not know (skipped)."""
    body = (
        u32(A_DEV_INDEX, index) + string(A_DEV_NAME, name) + u32(A_PORT_INDEX, num_ports)
        + u64(A_CAP_FLAGS, 0x1234, pad=True) + string(A_FW_VERSION, "16.35.2000")
        + u64(A_NODE_GUID, 2**63 + 7, pad=True) + attr(200, b"future attribute")
    )
    return message(TYPE_GET, seq, body, NLM_F_MULTI)


def port_reply(seq: int, index: int, name: str, port: int, netdev: str) -> bytes:
    body = (
        u32(A_DEV_INDEX, index) + string(A_DEV_NAME, name) + u32(A_PORT_INDEX, port)
        + u8(A_PORT_STATE, 4) + string(A_NDEV_NAME, netdev)
    )
    return message(TYPE_PORT_GET, seq, body, NLM_F_MULTI)


@dataclass
class Request:
    """A request as the fake kernel parsed it (with struct, not with pdpush)."""

    raw: bytes
    mtype: int
    flags: int
    seq: int
    attrs: dict[int, bytes]

    @classmethod
    def parse(cls, raw: bytes) -> "Request":
        length, mtype, flags, seq, _pid = struct.unpack_from("=IHHII", raw)
        assert length == len(raw), "request length field must match the datagram"
        attrs, off = {}, 16
        while off + 4 <= length:
            alen, atype = struct.unpack_from("=HH", raw, off)
            attrs[atype] = raw[off + 4 : off + alen]
            off += (alen + 3) & ~3
        return cls(raw, mtype, flags, seq, attrs)

    def u32(self, atype: int) -> int | None:
        payload = self.attrs.get(atype)
        return None if payload is None else struct.unpack("=I", payload)[0]


@dataclass
class ModelKernel:
    """What the RDMA core would answer: devices[index] = (name, {port: counters})."""

    devices: dict[int, tuple[str, dict[int, dict[str, int]]]] = field(default_factory=dict)
    pad: bool = True
    chunk: int = 2  # dump messages per datagram, to exercise multi-message datagrams

    def answer(self, req: Request) -> list[bytes]:
        if req.mtype == TYPE_GET:
            msgs = [device_reply(req.seq, i, n, len(p)) for i, (n, p) in sorted(self.devices.items())]
            return self._dump(msgs, req.seq)
        index = req.u32(A_DEV_INDEX)
        if index not in self.devices:
            return [error(req.seq, errno.EINVAL, req.raw)]  # ib_device_get_by_index() failed
        name, ports = self.devices[index]
        if req.mtype == TYPE_PORT_GET:
            msgs = [port_reply(req.seq, index, name, p, f"eth{index}") for p in sorted(ports)]
            return self._dump(msgs, req.seq)
        port = req.u32(A_PORT_INDEX)
        if req.mtype != TYPE_STAT_GET or port not in ports:
            return [error(req.seq, errno.EINVAL, req.raw)]
        return [stat_reply(req.seq, index, name, port, ports[port], self.pad)]

    def _dump(self, msgs: list[bytes], seq: int) -> list[bytes]:
        msgs = msgs + [done(seq)]
        return [b"".join(msgs[i : i + self.chunk]) for i in range(0, len(msgs), self.chunk)]


class FakeKernel:
    """Answers requests arriving on one end of an AF_UNIX datagram socketpair from a thread.

    `responder(request) -> list of datagrams` defaults to the model kernel; tests replace it
    to send errors, malformed or stale replies. `requests` records what the reader sent."""

    def __init__(self, model: ModelKernel | None = None):
        self.model = model or ModelKernel()
        self.responder: Callable[[Request], list[bytes]] = self.model.answer
        self.requests: list[Request] = []
        self.client, self._kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._kernel.settimeout(0.05)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self._kernel.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            req = Request.parse(raw)
            self.requests.append(req)
            for datagram in self.responder(req):
                self._kernel.send(datagram)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._kernel.close()
        self.client.close()
