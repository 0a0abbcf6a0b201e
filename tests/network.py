"""This machine's addresses, for tests that serve the app where another machine could reach it."""

from __future__ import annotations

import socket


def non_loopback_ipv4() -> str | None:
    """This machine's outward IPv4 address (None without one): connecting a UDP socket picks the route and sends
    nothing."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("192.0.2.1", 9))
        address = probe.getsockname()[0]
    except OSError:
        return None
    finally:
        probe.close()
    return None if address.startswith("127.") or address == "0.0.0.0" else address
