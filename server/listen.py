"""Where the server listens: which ``--host`` means every interface, where the metrics listen
by default, and why a port could not be bound (a busy port, a privileged one)."""

from __future__ import annotations

import errno
import ipaddress
import socket

#: ``--host`` spellings that name no address and so mean every interface, as gRPC reads them.
_NO_ADDRESS = {"", "*"}


def is_every_interface(host: str) -> bool:
    """Whether ``host`` listens on every interface: the unspecified address in any spelling
    (``[::]``, ``::``, ``[::0]``, ``0:0::0``, ``0.0.0.0``, ``::ffff:0.0.0.0``, and the
    short IPv4 forms the resolver takes, ``0`` or ``0x0``), ``*`` or nothing."""
    address = host.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if address in _NO_ADDRESS:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%")[0])  # drop an IPv6 zone ("::%eth0")
    except ValueError:
        try:  # the resolver also reads inet_aton's forms: "0", "0.0", "0x0"
            return socket.inet_aton(address) == bytes(4)
        except OSError:
            return False  # a name: it resolves to the addresses of one interface or more
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_unspecified or (mapped is not None and mapped.is_unspecified)


def default_metrics_host(host: str) -> str:
    """``--metrics-host``'s default: ``host``, or loopback when ``host`` is every interface
    (metrics are for the machine's own scraper unless asked for)."""
    return "127.0.0.1" if is_every_interface(host) else host.strip().strip("[]")


def bind_problem(host: str, port: int) -> str:
    """Why gRPC could not listen on host:port, found by trying to bind the same address."""
    address = host.strip("[]") or "::"
    try:
        infos = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            # As gRPC does: a port in TIME_WAIT is free, a listening one is not.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return f"port {port} is already in use"
                if exc.errno == errno.EACCES:
                    return f"port {port}: permission denied (ports below 1024 need privileges)"
                return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return f"cannot listen on {host}:{port}"


__all__ = ["bind_problem", "default_metrics_host", "is_every_interface"]
