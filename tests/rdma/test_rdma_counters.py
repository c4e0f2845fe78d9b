"""Driver counter table, totals, filters and the rate sampler."""

import pytest

from pdpush.rdma.counters import (
    DRIVER_TABLE,
    PortCounters,
    RateSampler,
    rx_tx_totals,
    select,
    traffic_rates,
)


def sample(counters, device="dev_0", port=1, t=0.0, driver=None):
    return PortCounters(device, port, counters, "netlink", t, driver)


@pytest.mark.parametrize(
    "device, driver, counters, want",
    [
        ("erdma_0", None, {"hw_rx_bytes_cnt": 2**40, "hw_rx_packets_cnt": 3, "hw_tx_bytes_cnt": 4,
                           "hw_tx_packets_cnt": 5}, (2**40, 3, 4, 5)),
        ("erdma_1", None, {"rx_bytes_cnt": 7, "rx_packets_cnt": 1, "tx_bytes_cnt": 2,
                           "tx_packets_cnt": 3}, (7, 1, 2, 3)),
        ("mlx5_0", None, {"rdma_rx_bytes": 9, "port_rcv_data": 400, "rdma_rx_packets": 1},
         (9, 1, None, None)),
        ("rocep1s0", "mlx5_core", {"port_rcv_data": 400, "port_rcv_packets": 2, "port_xmit_data": 8,
                                   "port_xmit_packets": 1}, (400, 2, 8, 1)),
        ("efa_0", None, {"rx_bytes": 1, "rx_pkts": 2, "tx_bytes": 3, "tx_pkts": 4}, (1, 2, 3, 4)),
        ("irdma0", None, {"ip4InOctets": 10, "ip6InOctets": 5, "ip4InPkts": 1, "ip6InPkts": 1,
                          "ip4OutOctets": 2, "ip6OutOctets": 0, "ip4OutPkts": 1, "ip6OutPkts": 0},
         (15, 2, 2, 1)),
        # an unknown device name: found by which counters it has
        ("weird", None, {"hw_rx_bytes_cnt": 6}, (6, None, None, None)),
        ("weird", None, {"nothing": 6}, (None, None, None, None)),
    ],
)
def test_driver_table(device, driver, counters, want):
    totals = rx_tx_totals(sample(counters, device, driver=driver))
    assert tuple(totals.values()) == want


def test_table_override():
    table = dict(DRIVER_TABLE, erdma={"rx_bytes": (("my_rx",),)})
    totals = rx_tx_totals(sample({"my_rx": 11, "hw_rx_bytes_cnt": 1}, "erdma_0"), table)
    assert totals["rx_bytes"] == 11 and totals["tx_bytes"] is None


def test_rates_on_sample_timestamps():
    sampler = RateSampler()
    assert sampler.update([sample({"a": 100, "b": 0}, t=10.0)]) == []
    (rates,) = sampler.update([sample({"a": 300, "b": 2**33}, t=12.0)])
    assert rates.interval_s == 2.0
    assert rates.rates == {"a": 100.0, "b": 2**32}
    assert rates.resets == ()


def test_counter_going_backwards_is_a_reset_never_negative():
    sampler = RateSampler()
    sampler.update([sample({"a": 1000, "b": 5}, t=0.0)])
    (rates,) = sampler.update([sample({"a": 30, "b": 5}, t=1.0)])
    assert rates.resets == ("a",)
    assert rates.rates == {"a": 30.0, "b": 0.0}
    assert min(rates.rates.values()) >= 0


def test_new_counter_and_non_increasing_time_give_no_rate():
    sampler = RateSampler()
    sampler.update([sample({"a": 1}, t=5.0)])
    assert sampler.update([sample({"a": 2}, t=5.0)]) == []
    (rates,) = sampler.update([sample({"a": 3, "new": 9}, t=6.0)])
    assert rates.rates == {"a": 1.0}


def test_ports_are_tracked_separately_and_traffic_rates_use_the_table():
    sampler = RateSampler()
    sampler.update([sample({"hw_rx_bytes_cnt": 0}, "erdma_0", 1, 0.0),
                    sample({"hw_rx_bytes_cnt": 50}, "erdma_0", 2, 0.0)])
    new = [sample({"hw_rx_bytes_cnt": 10}, "erdma_0", 1, 0.5),
           sample({"hw_rx_bytes_cnt": 50}, "erdma_0", 2, 0.5)]
    r1, r2 = sampler.update(new)
    assert traffic_rates(r1, new[0])["rx_bytes"] == 20.0
    assert traffic_rates(r2, new[1])["rx_bytes"] == 0.0


def test_select_filters_devices_ports_and_counter_globs():
    samples = [sample({"rx_a": 1, "tx_a": 2}, "d0", 1), sample({"rx_b": 1}, "d0", 2),
               sample({"rx_c": 1}, "d1", 1)]
    assert [s.link for s in select(samples, devices=["d0"])] == ["d0/1", "d0/2"]
    assert [s.link for s in select(samples, ports=[2])] == ["d0/2"]
    assert [s.counters for s in select(samples, devices=["d0"], counters=["rx_*"])] == [
        {"rx_a": 1}, {"rx_b": 1}]
