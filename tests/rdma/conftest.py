"""Fixtures of the RDMA reader tests: a fake kernel on a socketpair and a sysfs tree."""

import os
from pathlib import Path

import pytest
from rdma_fakes import FakeKernel, ModelKernel

BIG = 2**32  # values at and above 2^32 show a reader that cuts u64 to 32 bits

TWO_DEVICES = {
    0: ("erdma_0", {1: {"hw_rx_bytes_cnt": 0x282_24BC10A2, "hw_rx_packets_cnt": BIG - 1,
                        "hw_tx_bytes_cnt": BIG, "hw_tx_packets_cnt": 5}}),
    3: ("mlx5_1", {1: {"rdma_rx_bytes": 2**64 - 1, "out_of_buffer": 0},
                   2: {"rdma_rx_bytes": BIG + 7, "out_of_buffer": 3}}),
}


@pytest.fixture
def kernel():
    fake = FakeKernel(ModelKernel(devices={k: (n, {p: dict(c) for p, c in ports.items()})
                                           for k, (n, ports) in TWO_DEVICES.items()}))
    yield fake
    fake.close()


def write_counters(directory: Path, values: dict[str, object]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, value in values.items():
        (directory / name).write_text(f"{value}\n")


@pytest.fixture
def sysfs_root(tmp_path):
    """ROOT/class/infiniband with an mlx5 device (IB port counters + hw_counters, driver link)
    and an erdma device (hw_counters only)."""
    ib = tmp_path / "class" / "infiniband"
    mlx = ib / "rocep1s0f0" / "ports" / "1"
    write_counters(mlx / "counters", {"port_rcv_data": 100, "port_xmit_data": BIG,
                                      "port_rcv_packets": 10, "port_xmit_packets": 20})
    write_counters(mlx / "hw_counters", {"out_of_buffer": 1, "lifespan": 10, "np_cnp_sent": "N/A"})
    drivers = tmp_path / "bus" / "pci" / "drivers" / "mlx5_core"
    drivers.mkdir(parents=True)
    pci = tmp_path / "devices" / "0000:01:00.0"
    pci.mkdir(parents=True)
    os.symlink(drivers, pci / "driver")
    os.symlink(pci, ib / "rocep1s0f0" / "device")
    write_counters(ib / "erdma_0" / "ports" / "1" / "hw_counters", {"hw_rx_bytes_cnt": BIG * 3})
    return tmp_path
