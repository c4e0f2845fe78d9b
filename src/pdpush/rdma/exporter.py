"""Prometheus exporter for `pdpush rdma-stat --serve HOST:PORT`: counters are read at scrape
time (no background polling), so Prometheus' own rate() gives the rates."""

from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdpush.rdma.counters import QUANTITIES, rx_tx_totals, select
from pdpush.rdma.errors import RdmaError
from pdpush.rdma.reader import RdmaCounterReader

log = logging.getLogger(__name__)


class RdmaCollector:
    """Collector reading the reader on each scrape; serialised because scrapes run in threads."""

    def __init__(self, reader: RdmaCounterReader, ports: list[int] = (), counters: list[str] = ()):
        self.reader = reader
        self.ports = list(ports)
        self.counters = list(counters)
        self._lock = threading.Lock()

    def _sample(self):
        with self._lock:
            try:
                return select(self.reader.read(), ports=self.ports)
            except RdmaError as exc:
                log.warning("scrape failed: %s", exc)
                self.reader.refresh()  # a vanished device is dropped at the next scrape
                return None

    def collect(self):
        samples = self._sample()
        up = GaugeMetricFamily("rdma_up", "1 when the last read of the RDMA counters succeeded")
        up.add_metric([], 0 if samples is None else 1)
        yield up
        if samples is None:
            return
        labels = ["device", "port", "source"]
        hw = CounterMetricFamily("rdma_hw_counter", "RDMA hardware counter", labels=[*labels, "counter"])
        traffic = {
            q: CounterMetricFamily(f"rdma_{q}", f"RDMA {q} per the driver counter table", labels=labels)
            for q in QUANTITIES
        }
        for s in samples:
            link = [s.device, str(s.port), s.source]
            for q, value in rx_tx_totals(s).items():
                if value is not None:
                    traffic[q].add_metric(link, value)
            for name, value in select([s], counters=self.counters)[0].counters.items():
                hw.add_metric(link + [name], value)
        yield hw
        yield from traffic.values()


def start(collector: RdmaCollector, host: str, port: int):
    """Serve /metrics on host:port from a background thread; returns the server (call
    `shutdown()` then `server_close()` to stop). Port 0 picks a free port (`server_port`)."""
    registry = CollectorRegistry()
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
