"""Which addresses are this host's, and which one D advertises to its Ps.

D tells each P where its side channel is (the push target's `side_channel`); an address only D's
own host can reach (loopback) sends a remote P to whatever listens on *its* loopback, so D
refuses to start with such a pairing (PdpushConfig.check_served).
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


def url_host(url: str) -> str:
    return urlsplit(url).hostname or ""


def _addresses(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


def is_loopback(host: str) -> bool:
    addrs = _addresses(host)
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def is_local_host(host: str) -> bool:
    """True when `host` is this machine: loopback, or an address a socket here can bind to."""
    addrs = _addresses(host)
    if not addrs:
        return False  # unknown names count as remote: the safe side for the key check
    for addr in addrs:
        if ipaddress.ip_address(addr.split("%")[0]).is_loopback:
            continue
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.bind((addr, 0))
        except OSError:
            return False
    return True


def detect_address(peer_hosts: list[str]) -> str:
    """The local address that routes to the first non-loopback peer (127.0.0.1 if none is)."""
    for host in peer_hosts:
        for addr in _addresses(host):
            if ipaddress.ip_address(addr.split("%")[0]).is_loopback:
                continue
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            try:
                with socket.socket(family, socket.SOCK_DGRAM) as s:
                    s.connect((addr, 9))  # UDP: no packet is sent, only a route is chosen
                    return s.getsockname()[0]
            except OSError:
                continue
    return "127.0.0.1"
