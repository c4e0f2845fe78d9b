"""Read RDMA hardware counters as full 64-bit values (`rdma statistic show` of iproute2
v5.5-v5.16 cut them to 32 bits), from NETLINK_RDMA or from sysfs.

Without options: one line per port, like `rdma statistic show`. --watch SECONDS shows live
rates, --json prints one JSON object per sample, --serve HOST:PORT runs a Prometheus exporter.
RX/TX bytes and packets come from a per-driver table of counter names (erdma, mlx5, efa, irdma,
IB port counters). Errors print one line on stderr and exit 1; no RDMA device is not an error."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time

from pdpush.rdma.counters import PortCounters, PortRates, RateSampler, rx_tx_totals, select, traffic_rates
from pdpush.rdma.errors import RdmaError
from pdpush.rdma.reader import SOURCES, RdmaCounterReader


def host_port(text: str) -> tuple[str, int]:
    """HOST:PORT (or [V6]:PORT) for --serve."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT such as 127.0.0.1:9400, got {text!r}")
    return host.strip("[]"), int(port)


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", choices=SOURCES, default="auto",
                        help="where to read: netlink, sysfs, or auto = netlink, else sysfs (default)")
    parser.add_argument("--sysfs-root", default="/sys", metavar="DIR",
                        help="where sysfs is mounted (containers may mount the host's elsewhere)")
    parser.add_argument("-d", "--device", action="append", default=[], metavar="NAME",
                        help="only this device (repeatable)")
    parser.add_argument("-p", "--port", action="append", type=int, default=[], metavar="N",
                        help="only this port number (repeatable)")
    parser.add_argument("-c", "--counter", action="append", default=[], metavar="GLOB",
                        help="only counters matching this glob, e.g. '*rx_bytes*' (repeatable)")
    parser.add_argument("--json", action="store_true", help="one JSON object per sample on stdout")
    parser.add_argument("--watch", type=positive_seconds, metavar="SECONDS",
                        help="sample every SECONDS and show rates per second")
    parser.add_argument("--count", type=int, metavar="N",
                        help="with --watch: stop after N samples (default: until Ctrl-C)")
    parser.add_argument("--serve", type=host_port, metavar="HOST:PORT",
                        help="serve Prometheus metrics on HOST:PORT/metrics (read at each scrape)")
    parser.add_argument("--timeout", type=positive_seconds, default=2.0, metavar="SECONDS",
                        help="how long to wait for a netlink reply (default 2)")


def run(args: argparse.Namespace) -> int:
    if args.count is not None and (args.count < 1 or not args.watch):
        _say("--count N needs --watch and N >= 1")
        return 2
    try:
        with RdmaCounterReader(args.source, args.sysfs_root, args.device, args.timeout) as reader:
            if reader.fallback_reason:
                _say(f"{reader.fallback_reason}; reading sysfs under {args.sysfs_root} instead")
            if args.serve:
                return _serve(reader, args)
            if args.watch:
                return _watch(reader, args)
            return _once(reader, args)
    except RdmaError as exc:
        _say(str(exc))
        return 1


def _say(line: str) -> None:
    print(f"rdma-stat: {line}", file=sys.stderr, flush=True)


def _read(reader: RdmaCounterReader, args: argparse.Namespace) -> list[PortCounters]:
    return select(reader.read(), ports=args.port, counters=args.counter)


def _no_devices(reader: RdmaCounterReader, args: argparse.Namespace) -> None:
    where = f"{args.sysfs_root}/class/infiniband"
    if reader.source == "netlink":
        where = "the kernel (netlink)"
    wanted = f" matching {', '.join(args.device)}" if args.device else ""
    _say(f"no RDMA devices{wanted} found in {where}")


def _once(reader: RdmaCounterReader, args: argparse.Namespace) -> int:
    samples = _read(reader, args)
    if not samples:
        _no_devices(reader, args)
    if args.json:
        print(json.dumps(_json_sample(samples, [], reader.source)), flush=True)
        return 0
    for s in samples:
        pairs = " ".join(f"{k} {v}" for k, v in s.counters.items())
        print(f"link {s.link} {pairs}".rstrip())
    return 0


def _json_sample(samples: list[PortCounters], rates: list[PortRates], source: str) -> dict:
    by_link = {r.link: r for r in rates}
    ports = []
    for s in samples:
        entry = {"device": s.device, "port": s.port, "driver": s.driver,
                 "counters": s.counters, "traffic": rx_tx_totals(s)}
        r = by_link.get(s.link)
        if r is not None:
            entry.update(interval_s=r.interval_s, rates=r.rates, resets=list(r.resets),
                         traffic_rates=traffic_rates(r, s))
        ports.append(entry)
    return {"time": time.time(), "source": source, "ports": ports}


def _samples_every(reader: RdmaCounterReader, args: argparse.Namespace):
    """Samples on a monotonic schedule (no drift), `--count` of them or forever."""
    sampler = RateSampler()
    deadline = time.monotonic()
    n = 0
    while args.count is None or n < args.count:
        samples = _read(reader, args)
        if not samples and n == 0:
            _no_devices(reader, args)
        yield samples, sampler.update(samples)
        n += 1
        deadline += args.watch
        if args.count is None or n < args.count:
            time.sleep(max(0.0, deadline - time.monotonic()))


def _watch(reader: RdmaCounterReader, args: argparse.Namespace) -> int:
    if args.json:
        for samples, rates in _samples_every(reader, args):
            print(json.dumps(_json_sample(samples, rates, reader.source)), flush=True)
        return 0
    from rich.live import Live  # rich only for the live view

    with Live(auto_refresh=False) as live:
        for samples, rates in _samples_every(reader, args):
            live.update(_table(samples, rates, reader.source), refresh=True)
    return 0


def _table(samples: list[PortCounters], rates: list[PortRates], source: str):
    from rich.table import Table

    by_link = {r.link: r for r in rates}
    table = Table(title=f"RDMA counters ({source}, rates per second)")
    for column in ("link", "counter", "value", "rate/s"):
        table.add_column(column, justify="left" if column in ("link", "counter") else "right")
    for s in samples:
        r = by_link.get(s.link)
        for q, value in rx_tx_totals(s).items():
            if value is not None:
                rate = traffic_rates(r, s)[q] if r else None
                table.add_row(s.link, f"[bold]{q}[/bold]", f"{value:,}", _rate(rate))
        for name, value in s.counters.items():
            table.add_row(s.link, name, f"{value:,}", _rate(r.rates.get(name) if r else None))
    return table


def _rate(value: float | None) -> str:
    return "" if value is None else f"{value:,.1f}"


def _serve(reader: RdmaCounterReader, args: argparse.Namespace) -> int:
    from pdpush.rdma.exporter import RdmaCollector, start  # prometheus_client only here

    host, port = args.serve
    try:
        server = start(RdmaCollector(reader, args.port, args.counter), host, port)
    except OSError as exc:
        _say(f"cannot listen on {host}:{port}: {exc.strerror}")
        return 1
    stop = threading.Event()
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    _say(f"serving Prometheus metrics on http://{host}:{server.server_port}/metrics (Ctrl-C stops)")
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":  # `python -m pdpush.rdma.cli`: imports no other pdpush command
    from pdpush.cli import main

    sys.exit(main(["rdma-stat", *sys.argv[1:]]))
