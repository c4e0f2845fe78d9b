"""The sysfs source on a tree built under tmp_path."""

import shutil

import pytest
from conftest import BIG

from pdpush.rdma import sysfs
from pdpush.rdma.errors import DeviceGone, PermissionDenied
from pdpush.rdma.reader import RdmaCounterReader


def test_reads_both_directories_and_converts_words_to_bytes(sysfs_root):
    samples = {s.device: s for s in RdmaCounterReader("sysfs", str(sysfs_root)).read()}
    mlx = samples["rocep1s0f0"]
    assert mlx.counters == {
        "port_rcv_data": 400, "port_xmit_data": BIG * 4, "port_rcv_packets": 10,
        "port_xmit_packets": 20, "out_of_buffer": 1,  # lifespan and "N/A" are not counters
    }
    assert (mlx.port, mlx.driver, mlx.source) == (1, "mlx5_core", "sysfs")
    assert samples["erdma_0"].counters == {"hw_rx_bytes_cnt": BIG * 3}
    assert samples["erdma_0"].driver is None


def test_missing_root_means_no_devices(tmp_path):
    assert RdmaCounterReader("sysfs", str(tmp_path / "nowhere")).read() == []


def test_device_filter(sysfs_root):
    reader = RdmaCounterReader("sysfs", str(sysfs_root), devices=["erdma_0"])
    assert reader.ports() == [("erdma_0", 1)]


def test_device_disappearing_between_samples(sysfs_root):
    reader = RdmaCounterReader("sysfs", str(sysfs_root))
    assert len(reader.read()) == 2
    shutil.rmtree(sysfs_root / "class" / "infiniband" / "erdma_0")
    with pytest.raises(DeviceGone, match="erdma_0/1 disappeared"):
        reader.read()
    reader.refresh()
    assert [s.device for s in reader.read()] == ["rocep1s0f0"]


def test_permission_denied(sysfs_root, monkeypatch):
    def denied(path, mode="r"):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(sysfs, "open", denied, raising=False)
    with pytest.raises(PermissionDenied, match="permission denied reading .*counters"):
        RdmaCounterReader("sysfs", str(sysfs_root)).read()
