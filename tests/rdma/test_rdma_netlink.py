"""The netlink path against kernel-format replies served on a socketpair."""

import asyncio
import errno
import struct

import pytest
import rdma_fakes as k
from conftest import BIG, TWO_DEVICES

from pdpush.rdma import netlink
from pdpush.rdma.errors import (
    DeviceGone,
    KernelError,
    MalformedMessage,
    NetlinkUnavailable,
    PermissionDenied,
    RdmaError,
)
from pdpush.rdma.netlink import AsyncRdmaNetlink, RdmaNetlink
from pdpush.rdma.reader import RdmaCounterReader


def test_u64_values_pad_and_several_devices_and_ports(kernel):
    reader = RdmaCounterReader(netlink=RdmaNetlink(kernel.client))
    got = {(s.device, s.port): s.counters for s in reader.read()}
    want = {(name, p): c for name, ports in TWO_DEVICES.values() for p, c in ports.items()}
    assert got == want
    # the strace in the design document (docs/architecture.md, Origin): iproute2 printed 616304802 for hw_rx_bytes_cnt, the low 32 bits
    assert got[("erdma_0", 1)]["hw_rx_bytes_cnt"] == 0x282_24BC10A2 != 616304802
    assert all(s.source == "netlink" for s in reader.read())


def test_without_pad_attributes(kernel):
    kernel.model.pad = False
    with RdmaNetlink(kernel.client) as nl:
        assert nl.stat(3, 2) == {"rdma_rx_bytes": BIG + 7, "out_of_buffer": 3}


def test_devices_and_ports_skip_unknown_attributes(kernel):
    nl = RdmaNetlink(kernel.client)
    devices = nl.devices()
    assert [(d.index, d.name, d.num_ports) for d in devices] == [(0, "erdma_0", 1), (3, "mlx5_1", 2)]
    assert [(p.port, p.netdev) for p in nl.ports(3)] == [(1, "eth3"), (2, "eth3")]


def test_requests_follow_the_kernel_format(kernel):
    RdmaNetlink(kernel.client).stat(3, 2)
    RdmaNetlink(kernel.client).ports(0)
    stat, ports = kernel.requests
    assert (stat.mtype, stat.flags) == (k.TYPE_STAT_GET, k.NLM_F_REQUEST)
    assert (stat.u32(k.A_DEV_INDEX), stat.u32(k.A_PORT_INDEX)) == (3, 2)
    assert (ports.mtype, ports.flags) == (k.TYPE_PORT_GET, k.NLM_F_REQUEST | k.NLM_F_DUMP)
    assert ports.u32(k.A_DEV_INDEX) == 0


def test_unknown_attribute_inside_a_counter_entry(kernel):
    entry = k.hw_entry("x", BIG, extra=k.u32(k.A_HWC_INDEX, 9))
    body = k.u32(k.A_DEV_INDEX, 0) + k.u32(k.A_PORT_INDEX, 1) + k.attr(k.A_HWCOUNTERS, entry, nested=True)
    kernel.responder = lambda req: [k.message(k.TYPE_STAT_GET, req.seq, body)]
    assert RdmaNetlink(kernel.client).stat(0, 1) == {"x": BIG}


def test_stale_reply_of_an_earlier_request_is_skipped(kernel):
    model = kernel.model.answer
    kernel.responder = lambda req: [k.stat_reply(req.seq - 1, 0, "erdma_0", 1, {"old": 1})] + model(req)
    assert "old" not in RdmaNetlink(kernel.client).stat(0, 1)


def test_nlmsg_error_is_a_typed_error(kernel):
    kernel.responder = lambda req: [k.error(req.seq, errno.EMSGSIZE, req.raw)]
    with pytest.raises(KernelError) as info:
        RdmaNetlink(kernel.client).stat(0, 1)
    assert info.value.errno == errno.EMSGSIZE
    assert "EMSGSIZE" in str(info.value) and "device 0 port 1" in str(info.value)


def test_error_inside_a_dump(kernel):
    kernel.responder = lambda req: [k.device_reply(req.seq, 0, "a", 1) + k.error(req.seq, errno.EIO)]
    with pytest.raises(KernelError, match="EIO"):
        RdmaNetlink(kernel.client).devices()


def test_permission_denied_reply(kernel):
    kernel.responder = lambda req: [k.error(req.seq, errno.EPERM, req.raw)]
    with pytest.raises(PermissionDenied, match="EPERM"):
        RdmaNetlink(kernel.client).devices()


@pytest.mark.parametrize("cut", [3, 17, 40])
def test_truncated_reply(kernel, cut):
    kernel.responder = lambda req: [k.stat_reply(req.seq, 0, "erdma_0", 1, {"a": 1})[:-cut]]
    with pytest.raises(MalformedMessage):
        RdmaNetlink(kernel.client).stat(0, 1)


def _stat_with_table(req, table: bytes) -> list[bytes]:
    body = k.u32(k.A_DEV_INDEX, 0) + k.u32(k.A_PORT_INDEX, 1) + k.attr(k.A_HWCOUNTERS, table, nested=True)
    return [k.message(k.TYPE_STAT_GET, req.seq, body)]


@pytest.mark.parametrize(
    "table, what",
    [
        # a u64 value of 4 bytes must not be read out of the following bytes
        (k.attr(k.A_HWC_ENTRY, k.string(k.A_HWC_NAME, "a") + k.u32(k.A_HWC_VALUE, 5), True), "not 8"),
        (k.attr(k.A_HWC_ENTRY, k.attr(k.A_HWC_NAME, b"abcd") + k.u64(k.A_HWC_VALUE, 1), True), "NUL"),
        (k.attr(k.A_HWC_ENTRY, k.string(k.A_HWC_NAME, "a"), True), "without a name or a value"),
        # an entry claiming more bytes than its parent holds
        (struct.pack("=HH", 200, k.A_HWC_ENTRY | k.NESTED) + k.string(k.A_HWC_NAME, "a"), "remain"),
    ],
)
def test_malformed_counter_table(kernel, table, what):
    kernel.responder = lambda req: _stat_with_table(req, table)
    with pytest.raises(MalformedMessage, match=what):
        RdmaNetlink(kernel.client).stat(0, 1)


def test_malformed_top_level_attribute(kernel):
    body = struct.pack("=HH", 4 + 2, k.A_DEV_INDEX) + b"\1\0\0\0" + k.u32(k.A_PORT_INDEX, 1)
    kernel.responder = lambda req: [k.message(k.TYPE_STAT_GET, req.seq, body)]
    with pytest.raises(MalformedMessage, match="2 bytes where 4 expected"):
        RdmaNetlink(kernel.client).stat(0, 1)


def test_reply_about_another_port(kernel):
    kernel.responder = lambda req: [k.stat_reply(req.seq, 0, "erdma_0", 2, {"a": 1})]
    with pytest.raises(MalformedMessage, match="port 2"):
        RdmaNetlink(kernel.client).stat(0, 1)


def test_no_reply_times_out(kernel):
    kernel.responder = lambda req: []
    with pytest.raises(RdmaError, match="no reply"):
        RdmaNetlink(kernel.client, timeout=0.1).stat(0, 1)


def test_async_client_reads_the_same(kernel):
    async def read():
        async with AsyncRdmaNetlink(kernel.client) as nl:
            devices = await nl.devices()
            return [await nl.stat(d.index, p.port) for d in devices for p in await nl.ports(d.index)]

    want = [c for _, ports in TWO_DEVICES.values() for c in ports.values()]
    assert asyncio.run(read()) == want


def test_async_client_raises_kernel_errors(kernel):
    kernel.responder = lambda req: [k.error(req.seq, errno.EMSGSIZE)]

    async def read():
        return await AsyncRdmaNetlink(kernel.client).stat(0, 1)

    with pytest.raises(KernelError):
        asyncio.run(read())


def test_device_disappearing_between_samples(kernel):
    reader = RdmaCounterReader(netlink=RdmaNetlink(kernel.client))
    assert len(reader.read()) == 3
    del kernel.model.devices[3]
    with pytest.raises(DeviceGone, match="mlx5_1/1 disappeared"):
        reader.read()
    reader.refresh()
    assert [s.device for s in reader.read()] == ["erdma_0"]


def test_port_without_hardware_counters_reads_empty(kernel):
    """stat_get_doit_default_counter answers EINVAL when the port has no rdma_hw_stats."""
    reader = RdmaCounterReader(netlink=RdmaNetlink(kernel.client))
    model = kernel.model.answer
    no_stats = {(0, 1), (3, 2)}

    def answer(r):
        if r.mtype == k.TYPE_STAT_GET and (r.u32(k.A_DEV_INDEX), r.u32(k.A_PORT_INDEX)) in no_stats:
            return [k.error(r.seq, errno.EINVAL, r.raw)]
        return model(r)

    kernel.responder = answer
    assert [(s.link, len(s.counters)) for s in reader.read()] == [("erdma_0/1", 0), ("mlx5_1/1", 2), ("mlx5_1/2", 0)]


def test_other_errors_for_a_present_port_are_raised(kernel):
    reader = RdmaCounterReader(netlink=RdmaNetlink(kernel.client))
    reader.ports()
    model = kernel.model.answer
    kernel.responder = lambda r: [k.error(r.seq, errno.EIO)] if r.mtype == k.TYPE_STAT_GET else model(r)
    with pytest.raises(KernelError, match="EIO"):
        reader.read()


@pytest.mark.parametrize(
    "code, error",
    [(errno.EPROTONOSUPPORT, NetlinkUnavailable), (errno.EACCES, PermissionDenied), (errno.EMFILE, RdmaError)],
)
def test_socket_errors(monkeypatch, code, error):
    def refuse(*args):
        raise OSError(code, "refused")

    monkeypatch.setattr(netlink.socket, "socket", refuse)
    with pytest.raises(error):
        RdmaNetlink()


def test_auto_falls_back_to_sysfs_without_rdma_netlink(monkeypatch, sysfs_root):
    def unsupported():
        raise NetlinkUnavailable("no RDMA netlink")

    monkeypatch.setattr(netlink, "open_netlink_socket", unsupported)
    reader = RdmaCounterReader("auto", str(sysfs_root))
    assert (reader.source, reader.fallback_reason) == ("sysfs", "no RDMA netlink")
    assert {s.device for s in reader.read()} == {"rocep1s0f0", "erdma_0"}
    with pytest.raises(NetlinkUnavailable):
        RdmaCounterReader("netlink", str(sysfs_root))


def test_reader_totals_sum_the_driver_counters_of_all_ports(kernel):
    reader = RdmaCounterReader(netlink=RdmaNetlink(kernel.client))
    assert reader.rx_tx_totals() == {
        "rx_bytes": 0x282_24BC10A2 + (2**64 - 1) + (BIG + 7),  # erdma hw_ names + mlx5 rdma_rx_bytes
        "rx_packets": BIG - 1,  # mlx5_1 has no rdma_rx_packets: only erdma's count
        "tx_bytes": BIG,
        "tx_packets": 5,
    }
