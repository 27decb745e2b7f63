"""Channel set-up shared by the sync and async clients: targets, load balancing, retries and
message-size limits.

Targets:

- ``"host:port"``: one name; gRPC's DNS resolver may return several addresses, and the
  client spreads calls over all of them (round_robin).
- ``"dns:///gramstyle.ns.svc.cluster.local:50051"``: the same, spelled out. With a Kubernetes
  *headless* Service this resolves to every pod, so calls are balanced per request rather
  than pinned to one pod by an L4 balancer.
- Several addresses, as a list or comma-separated: ``"127.0.0.1:5001,127.0.0.1:5002"`` or
  ``["10.0.0.5:50051", "10.0.0.6:50051"]``. They become gRPC's static ``ipv4:``/``ipv6:``
  target (host names in such a list are resolved once, here).
- Any other gRPC target URI (``ipv4:...``, ``unix:...``) is used as is.

Retries: calls that fail with UNAVAILABLE (server restarting, connection refused, a pod
draining) are retried with exponential backoff through the gRPC service config. gRPC retries
only before the server has sent a response, so a Stylize stream is never replayed halfway.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections.abc import Sequence

#: Send/receive limit; matches the server's default (a 2048 px PNG each way, with room).
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
SERVICE = "gramstyle.v1.StyleTransferService"


def _split_host_port(address: str) -> tuple[str, str]:
    host, sep, port = address.strip().rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"server: expected HOST:PORT, got {address!r}")
    return host.strip("[]"), port


def normalize_target(target: str | Sequence[str]) -> str:
    """A gRPC target string for one address, a URI, or several addresses."""
    if isinstance(target, str):
        if "://" in target or target.split(":", 1)[0] in ("ipv4", "ipv6", "unix", "dns"):
            return target
        addresses = [a for a in target.split(",") if a.strip()]
    else:
        addresses = [str(a) for a in target]
    if not addresses:
        raise ValueError(f"server: no address given in {target!r}")
    if len(addresses) == 1:
        _split_host_port(addresses[0])  # fail early on "localhost" without a port
        return addresses[0].strip()
    v4, v6 = [], []
    for address in addresses:
        host, port = _split_host_port(address)
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:  # a host name: resolve it now (static list, no re-resolution)
            infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            ips = [ipaddress.ip_address(info[4][0]) for info in infos]
        for ip in dict.fromkeys(ips):
            (v4 if ip.version == 4 else v6).append(
                f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    # A static target holds one address family; prefer IPv4 when both occur.
    return "ipv4:" + ",".join(v4) if v4 else "ipv6:" + ",".join(v6)


def service_config(retries: int = 4) -> str:
    """The JSON service config: round_robin and retries on UNAVAILABLE.

    ``retries`` is the total number of attempts (gRPC caps it at 5); 1 disables retries.
    """
    method: dict = {"name": [{"service": SERVICE}]}
    if retries > 1:
        method["retryPolicy"] = {
            "maxAttempts": min(retries, 5),
            "initialBackoff": "0.2s",
            "maxBackoff": "3s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": ["UNAVAILABLE"],
        }
    return json.dumps({
        # No client-side healthCheckConfig: it keeps a Health/Watch stream open per
        # connection, which would hold a draining server until its grace period ends. A
        # draining server refuses new calls (GOAWAY), round_robin drops it and the call is
        # retried on another replica.
        "loadBalancingConfig": [{"round_robin": {}}],
        "methodConfig": [method],
    })


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, retries: int = 4
                    ) -> list[tuple[str, object]]:
    """Channel arguments for ``grpc.insecure_channel`` / ``grpc.aio.insecure_channel``."""
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.service_config", service_config(retries)),
        # Our config, not one published in DNS TXT records.
        ("grpc.service_config_disable_resolution", 1),
        ("grpc.enable_retries", 1 if retries > 1 else 0),
        # A request is replayable only while it fits the retry buffer (default 256 KiB,
        # less than one image), so size the buffer for the largest request.
        ("grpc.per_rpc_retry_buffer_size", max_message_bytes),
        ("grpc.keepalive_time_ms", 60_000),
    ]
