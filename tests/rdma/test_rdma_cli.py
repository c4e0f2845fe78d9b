"""`pdpush rdma-stat` through pdpush.cli.main: exit codes, stdout, one-line errors."""

import errno
import json
import shutil
import socket
import urllib.request

import pytest
import rdma_fakes as k
from prometheus_client.parser import text_string_to_metric_families
from conftest import BIG, write_counters

from pdpush.cli import main
from pdpush.rdma import cli as rdma_cli
from pdpush.rdma import netlink
from pdpush.rdma.errors import NetlinkUnavailable
from pdpush.rdma.exporter import RdmaCollector, start
from pdpush.rdma.reader import RdmaCounterReader


@pytest.fixture
def no_netlink(monkeypatch):
    def unsupported():
        raise NetlinkUnavailable("this kernel has no RDMA netlink (EPROTONOSUPPORT)")

    monkeypatch.setattr(netlink, "open_netlink_socket", unsupported)


@pytest.fixture
def netlink_kernel(monkeypatch, kernel):
    monkeypatch.setattr(netlink, "open_netlink_socket", lambda: kernel.client)
    return kernel


def one_error_line(capsys, *words):
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rdma-stat: "), err
    for word in words:
        assert word in lines[0]


def test_one_shot_over_netlink_prints_full_64_bit_values(netlink_kernel, capsys):
    assert main(["rdma-stat"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"link erdma_0/1 hw_rx_bytes_cnt {0x282_24BC10A2} hw_rx_packets_cnt {BIG - 1} " \
                     f"hw_tx_bytes_cnt {BIG} hw_tx_packets_cnt 5"
    assert out[1] == f"link mlx5_1/1 rdma_rx_bytes {2**64 - 1} out_of_buffer 0"
    assert len(out) == 3


def test_filters(netlink_kernel, capsys):
    assert main(["rdma-stat", "-d", "mlx5_1", "-p", "2", "-c", "*rx*"]) == 0
    assert capsys.readouterr().out == f"link mlx5_1/2 rdma_rx_bytes {BIG + 7}\n"


def test_auto_falls_back_to_sysfs_with_one_line(no_netlink, sysfs_root, capsys):
    assert main(["rdma-stat", "--sysfs-root", str(sysfs_root), "-d", "erdma_0"]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"link erdma_0/1 hw_rx_bytes_cnt {BIG * 3}\n"
    assert "EPROTONOSUPPORT" in captured.err and "reading sysfs" in captured.err


def test_no_devices_anywhere_is_empty_and_exit_0(no_netlink, tmp_path, capsys):
    assert main(["rdma-stat", "--sysfs-root", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "no RDMA devices found" in captured.err and "Traceback" not in captured.err


def test_no_devices_json_is_an_empty_sample(no_netlink, tmp_path, capsys):
    assert main(["rdma-stat", "--sysfs-root", str(tmp_path), "--json"]) == 0
    sample = json.loads(capsys.readouterr().out)
    assert (sample["source"], sample["ports"]) == ("sysfs", [])


def test_explicit_netlink_without_kernel_support_fails(no_netlink, capsys):
    assert main(["rdma-stat", "--source", "netlink"]) == 1
    one_error_line(capsys, "EPROTONOSUPPORT")


def test_nlmsg_error_reply(netlink_kernel, capsys):
    model = netlink_kernel.model.answer
    netlink_kernel.responder = (
        lambda r: [k.error(r.seq, errno.EMSGSIZE)] if r.mtype == k.TYPE_STAT_GET else model(r)
    )
    assert main(["rdma-stat"]) == 1
    one_error_line(capsys, "EMSGSIZE", "STAT_GET")


def test_permission_denied_reply(netlink_kernel, capsys):
    netlink_kernel.responder = lambda r: [k.error(r.seq, errno.EPERM)]
    assert main(["rdma-stat"]) == 1
    one_error_line(capsys, "refused", "EPERM")


def test_truncated_reply(netlink_kernel, capsys):
    netlink_kernel.responder = lambda r: [k.device_reply(r.seq, 0, "erdma_0", 1)[:30]]
    assert main(["rdma-stat"]) == 1
    one_error_line(capsys, "truncated")


def test_malformed_reply(netlink_kernel, capsys):
    model = netlink_kernel.model.answer
    bad = k.attr(k.A_HWC_ENTRY, k.string(k.A_HWC_NAME, "a") + k.u32(k.A_HWC_VALUE, 1), nested=True)
    body = k.u32(k.A_DEV_INDEX, 0) + k.u32(k.A_PORT_INDEX, 1) + k.attr(k.A_HWCOUNTERS, bad, nested=True)
    netlink_kernel.responder = (
        lambda r: [k.message(k.TYPE_STAT_GET, r.seq, body)] if r.mtype == k.TYPE_STAT_GET else model(r)
    )
    assert main(["rdma-stat", "--json"]) == 1
    one_error_line(capsys, "not 8")


def test_watch_json_gives_rates_per_sample(no_netlink, sysfs_root, monkeypatch, capsys):
    counters = sysfs_root / "class/infiniband/rocep1s0f0/ports/1/counters"
    words = iter([125, 250])

    def sleep(seconds):  # the counter moves while we "sleep"
        write_counters(counters, {"port_rcv_data": 100 + next(words)})

    monkeypatch.setattr(rdma_cli.time, "sleep", sleep)
    argv = ["rdma-stat", "--sysfs-root", str(sysfs_root), "-d", "rocep1s0f0", "--json", "--watch", "0.5",
            "--count", "3"]
    assert main(argv) == 0
    samples = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(samples) == 3
    assert "rates" not in samples[0]["ports"][0]
    for s, words_added in zip(samples[1:], (125, 125)):
        port = s["ports"][0]
        assert port["traffic"]["rx_bytes"] == port["counters"]["port_rcv_data"]
        assert port["rates"]["port_rcv_data"] == pytest.approx(words_added * 4 / port["interval_s"])
        assert port["traffic_rates"]["rx_bytes"] == port["rates"]["port_rcv_data"]


def test_watch_table(no_netlink, sysfs_root, monkeypatch, capsys):
    monkeypatch.setattr(rdma_cli.time, "sleep", lambda s: None)
    assert main(["rdma-stat", "--sysfs-root", str(sysfs_root), "--watch", "1", "--count", "2"]) == 0
    out = capsys.readouterr().out
    for text in ("rocep1s0f0/1", "rx_bytes", "port_xmit_data", f"{BIG * 4:,}", "0.0"):
        assert text in out


def test_device_disappearing_during_watch(sysfs_root, monkeypatch, capsys):
    gone = sysfs_root / "class/infiniband/erdma_0"
    monkeypatch.setattr(rdma_cli.time, "sleep", lambda s: shutil.rmtree(gone))
    argv = ["rdma-stat", "--source", "sysfs", "--sysfs-root", str(sysfs_root), "--json", "--watch", "1"]
    assert main(argv) == 1
    one_error_line(capsys, "erdma_0/1 disappeared")


@pytest.mark.parametrize("argv", [["--serve", "9400"], ["--serve", "host:port"], ["--watch", "0"],
                                  ["--source", "rdma"]])
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(["rdma-stat", *argv])
    assert info.value.code == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--count", "3"], ["--watch", "1", "--count", "0"]])
def test_count_without_watch_is_refused(argv, capsys):
    assert main(["rdma-stat", *argv]) == 2
    one_error_line(capsys, "--count")


def scrape(url: str) -> dict[tuple, float]:
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_exporter_serves_counters_and_traffic(sysfs_root):
    reader = RdmaCounterReader("sysfs", str(sysfs_root))
    server = start(RdmaCollector(reader), "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    labels = (("device", "rocep1s0f0"), ("port", "1"), ("source", "sysfs"))
    try:
        metrics = scrape(url)
        assert metrics[("rdma_up", ())] == 1
        assert metrics[("rdma_rx_bytes_total", labels)] == 400
        xmit = tuple(sorted(labels + (("counter", "port_xmit_data"),)))
        assert metrics[("rdma_hw_counter_total", xmit)] == BIG * 4
        shutil.rmtree(sysfs_root / "class/infiniband/erdma_0")
        assert scrape(url)[("rdma_up", ())] == 0  # this scrape found erdma_0 gone
        assert scrape(url)[("rdma_up", ())] == 1  # and the next one re-enumerated
    finally:
        server.shutdown()
        server.server_close()


def test_serve_on_a_busy_port_fails_with_one_line(no_netlink, sysfs_root, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["rdma-stat", "--sysfs-root", str(sysfs_root), "--serve", f"127.0.0.1:{port}"]) == 1
    err = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in err and "Traceback" not in err


def test_one_shot_json_over_netlink(netlink_kernel, capsys):
    assert main(["rdma-stat", "--json", "-d", "erdma_0"]) == 0
    (port,) = json.loads(capsys.readouterr().out)["ports"]
    assert port["counters"]["hw_rx_bytes_cnt"] == 0x282_24BC10A2
    assert port["traffic"] == {"rx_bytes": 0x282_24BC10A2, "rx_packets": BIG - 1,
                               "tx_bytes": BIG, "tx_packets": 5}


def test_kernel_with_rdma_netlink_but_no_device(netlink_kernel, capsys):
    """The GPU test machine: the GET dump answers NLMSG_DONE alone."""
    netlink_kernel.model.devices.clear()
    assert main(["rdma-stat", "--source", "netlink", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["ports"] == []
    assert "no RDMA devices found in the kernel (netlink)" in captured.err
