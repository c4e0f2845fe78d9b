"""Benchmark the cost of one (device, port) RDMA counter sample through the netlink path.

A separate local process plays the kernel: it answers each request on an AF_UNIX datagram
socket with a kernel-format STAT_GET reply (COUNTERS u64 counters, the request's sequence
number patched in). Side by side: pdpush's sync and async clients on a persistent socket; the
way of the design document the project came from (docs/architecture.md, "Origin"), pyroute2's
AsyncNetlinkSocket + NetlinkRequest with the same message classes; the decode alone; and the bare
datagram round trip as the floor. --real-kernel adds the round trip of an
(empty when there are no devices) RDMA_NLDEV_CMD_GET dump against this machine's kernel.
This is a benchmark, not a test: it prints numbers and asserts nothing about them."""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import socket
import statistics
import struct
import sys
import time
from contextlib import contextmanager
from typing import Awaitable, Callable

from pdpush.command import positive_int
from pdpush.rdma.errors import RdmaError

DEV, PORT = 0, 1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--counters", type=positive_int, default=50, help="counters per reply (default 50)")
    parser.add_argument("--samples", type=positive_int, default=2000,
                        help="timed samples per path (default 2000)")
    parser.add_argument("--real-kernel", action="store_true",
                        help="also time a GET dump round trip against this kernel's NETLINK_RDMA")
    parser.add_argument("--json", action="store_true", help="print the results as one JSON object")


def kernel_reply(counters: int) -> bytearray:
    """A STAT_GET reply as the kernel lays it out, encoded with the pyroute2 classes."""
    from pdpush.rdma.messages import RDMA_NLDEV_CMD_STAT_GET, NldevMessage, nldev_type  # pyroute2

    entries = [
        ["RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY", {"attrs": [
            ["RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_NAME", f"hw_counter_{i}_cnt"],
            ["RDMA_NLDEV_ATTR_STAT_HWCOUNTER_ENTRY_VALUE", 2**40 + i],
        ]}]
        for i in range(counters)
    ]
    msg = NldevMessage()
    msg["header"]["type"] = nldev_type(RDMA_NLDEV_CMD_STAT_GET)
    msg["attrs"] = [
        ["RDMA_NLDEV_ATTR_DEV_INDEX", DEV],
        ["RDMA_NLDEV_ATTR_DEV_NAME", "erdma_0"],
        ["RDMA_NLDEV_ATTR_PORT_INDEX", PORT],
        ["RDMA_NLDEV_ATTR_STAT_HWCOUNTERS", {"attrs": entries}],
    ]
    msg.encode()
    return msg.data


def _answer(sock: socket.socket, reply: bytearray) -> None:
    """The fake kernel's loop: echo each request's sequence number in the canned reply."""
    while request := sock.recv(65536):
        reply[8:12] = request[8:12]
        sock.send(reply)


@contextmanager
def served_socket(reply: bytearray):
    """A client socket whose peer process answers every request with `reply`."""
    client, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    fork = multiprocessing.get_context("fork")
    peer = fork.Process(target=_answer, args=(kernel, reply), daemon=True)
    peer.start()
    kernel.close()
    try:
        yield client
    finally:
        client.setblocking(True)
        client.send(b"")  # an empty datagram ends the peer
        peer.join(timeout=5)
        client.close()


def _stats(times_ns: list[int]) -> dict[str, float]:
    q = statistics.quantiles(times_ns, n=100)
    return {"mean_us": statistics.fmean(times_ns) / 1e3, "p50_us": q[49] / 1e3, "p99_us": q[98] / 1e3}


def time_sync(call: Callable[[], object], samples: int) -> dict[str, float]:
    for _ in range(min(200, samples)):
        call()
    times = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        call()
        times.append(time.perf_counter_ns() - t)
    return _stats(times)


async def time_async(call: Callable[[], Awaitable[object]], samples: int) -> dict[str, float]:
    for _ in range(min(200, samples)):
        await call()
    times = []
    for _ in range(samples):
        t = time.perf_counter_ns()
        await call()
        times.append(time.perf_counter_ns() - t)
    return _stats(times)


def bench_floor(reply: bytearray, samples: int) -> dict[str, float]:
    request = bytes(reply[:16])  # any datagram: the peer only echoes the sequence number
    with served_socket(reply) as sock:
        return time_sync(lambda: (sock.send(request), sock.recv(65536)), samples)


def bench_decode(reply: bytearray, samples: int) -> dict[str, float]:
    from pdpush.rdma.messages import NldevMessage, hw_counters

    data = bytes(reply)

    def decode():
        msg = NldevMessage(data)
        msg.decode()
        return hw_counters(msg)

    return time_sync(decode, samples)


def bench_pdpush_sync(reply: bytearray, samples: int) -> dict[str, float]:
    from pdpush.rdma.netlink import RdmaNetlink

    with served_socket(reply) as sock:
        nl = RdmaNetlink(sock)
        return time_sync(lambda: nl.stat(DEV, PORT), samples)


def bench_pdpush_async(reply: bytearray, samples: int) -> dict[str, float]:
    from pdpush.rdma.netlink import AsyncRdmaNetlink

    with served_socket(reply) as sock:
        nl = AsyncRdmaNetlink(sock)
        return asyncio.run(time_async(lambda: nl.stat(DEV, PORT), samples))


def bench_pyroute2_socket(reply: bytearray, samples: int) -> dict[str, float]:
    """The design document's approach: pyroute2's AsyncNetlinkSocket and NetlinkRequest per sample."""
    from pyroute2.netlink import NLM_F_REQUEST
    from pyroute2.netlink.nlsocket import AsyncNetlinkSocket, NetlinkRequest

    from pdpush.rdma.messages import RDMA_NLDEV_CMD_STAT_GET, NldevMessage, hw_counters, nldev_type

    async def run(sock: socket.socket) -> dict[str, float]:
        nl = AsyncNetlinkSocket(use_socket=sock)
        nl.register_policy(nldev_type(RDMA_NLDEV_CMD_STAT_GET), NldevMessage)

        async def one():
            msg = NldevMessage()
            msg["attrs"] = [["RDMA_NLDEV_ATTR_DEV_INDEX", DEV], ["RDMA_NLDEV_ATTR_PORT_INDEX", PORT]]
            req = NetlinkRequest(
                nl, msg, msg_type=nldev_type(RDMA_NLDEV_CMD_STAT_GET), msg_flags=NLM_F_REQUEST
            )
            await req.send()
            return [hw_counters(r) async for r in req.response()]

        return await time_async(one, samples)

    with served_socket(reply) as sock:
        return asyncio.run(run(sock.dup()))


def bench_real_kernel(samples: int) -> dict[str, float] | str:
    from pdpush.rdma.netlink import RdmaNetlink

    try:
        with RdmaNetlink() as nl:
            devices = nl.devices()
            result = time_sync(nl.devices, samples)
    except RdmaError as exc:
        return str(exc)
    return dict(result, devices=len(devices))


def run(args: argparse.Namespace) -> int:
    reply = kernel_reply(args.counters)
    paths = {
        "datagram round trip only (floor)": bench_floor,
        "pdpush RdmaNetlink.stat (sync)": bench_pdpush_sync,
        "pdpush AsyncRdmaNetlink.stat": bench_pdpush_async,
        "pyroute2 AsyncNetlinkSocket request": bench_pyroute2_socket,
        "decode only, no I/O": bench_decode,
    }
    results = {}
    for name, bench in paths.items():
        if not args.json:
            print(f"timing {name} ...", flush=True)
        results[name] = bench(reply, args.samples)
    if args.real_kernel:
        results["real kernel: GET dump round trip"] = bench_real_kernel(args.samples)
    if args.json:
        print(json.dumps({"counters": args.counters, "reply_bytes": len(reply), "results": results}))
    else:
        _print_table(results, args, len(reply))
    return 0


def _print_table(results: dict, args: argparse.Namespace, reply_bytes: int) -> None:
    base = results["pdpush RdmaNetlink.stat (sync)"]["p50_us"]  # medians: the machine is shared
    print(f"\nOne (device, port) sample: {args.counters} u64 counters per reply ({reply_bytes} bytes), "
          f"{args.samples} samples per path, peer = local process")
    print(f"{'path':<44}{'mean us':>10}{'p50 us':>10}{'p99 us':>10}{'p50 x pdpush':>14}")
    for name, r in results.items():
        if isinstance(r, str):
            print(f"{name:<44}{r}")
            continue
        cells = f"{r['mean_us']:>10.1f}{r['p50_us']:>10.1f}{r['p99_us']:>10.1f}"
        print(f"{name:<44}{cells}{r['p50_us'] / base:>14.2f}")


if __name__ == "__main__":  # `python -m pdpush.bench.rdma`: imports no other pdpush command
    from pdpush.cli import main

    sys.exit(main(["bench", "rdma", *sys.argv[1:]]))
