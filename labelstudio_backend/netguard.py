"""Where the backend may connect: no private, loopback or link-local address unless the operator named it.

Task images and a Label Studio URL that `/setup` reports are addresses anyone who reaches the backend can
choose. A host is connected to only if every address it resolves to is public, unless it is the
configured Label Studio (`LABEL_STUDIO_URL`) or in the allow-list (`SEGGPT_ALLOWED_HOSTS`,
`--allow-host`: `name`, `name:port`, an IP address or a network such as `10.1.0.0/16`). The check runs
when the connection is made, on the address actually connected to (`GuardedAdapter`), so a name that
resolves to a public address for the check and to a private one a moment later (DNS rebinding) gains
nothing; redirects are new connections and are checked the same way.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class BlockedAddress(OSError):
    """A connection the policy refuses (raised before any packet is sent to the address)."""


def _ip(text: str):
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped if getattr(ip, "ipv4_mapped", None) else ip


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1 (a name or an address as given to --host)."""
    host = host.strip("[]").lower()
    if host == "localhost":
        return True
    ip = _ip(host)
    return ip is not None and ip.is_loopback


def is_public(ip) -> bool:
    return ip.is_global and not ip.is_multicast and not ip.is_reserved and not ip.is_unspecified


class HostPolicy:
    def __init__(self, trusted_origins=(), allowed_hosts=()):
        """trusted_origins: URLs whose (host, port) are connected to whatever they resolve to (the configured
        Label Studio). allowed_hosts: the operator's allow-list entries."""
        self.trusted: set[tuple[str, int]] = set()
        for origin in trusted_origins:
            if origin:
                parts = urlsplit(origin)
                if parts.hostname:
                    self.trusted.add((parts.hostname.lower(), parts.port or (443 if parts.scheme == "https" else 80)))
        self.names: set[str] = set()
        self.name_ports: set[tuple[str, int]] = set()
        self.networks = []
        for entry in allowed_hosts or ():
            self._add(str(entry).strip())

    def _add(self, entry: str) -> None:
        if not entry:
            return
        try:
            self.networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            return
        except ValueError:
            pass
        host, sep, port = entry.rpartition(":")
        if sep and port.isdigit() and host and (host.startswith("[") or ":" not in host):
            self.name_ports.add((host.strip("[]").lower(), int(port)))
        else:
            self.names.add(entry.strip("[]").lower())

    def named(self, host: str, port: int) -> bool:
        """Whether the operator named this host (configured Label Studio or allow-list): no address check."""
        host = host.lower().rstrip(".").strip("[]")
        if (host, port) in self.trusted or host in self.names or (host, port) in self.name_ports:
            return True
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self.networks)

    def _allowed_ip(self, ip) -> bool:
        return is_public(ip) or any(ip in net for net in self.networks)

    def resolve(self, host: str, port: int) -> list[tuple[int, str]]:
        """[(family, address)] to connect to for host:port; BlockedAddress if the policy refuses it."""
        host = host.rstrip(".").strip("[]")
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise BlockedAddress(f"cannot resolve {host!r} ({exc.strerror or exc})") from None
        addresses = list(dict.fromkeys((info[0], info[4][0]) for info in infos))
        if self.named(host, port):
            return addresses
        blocked = [a for _, a in addresses if (ip := _ip(a)) is None or not self._allowed_ip(ip)]
        if blocked:  # one private answer is enough to refuse: which one a client uses is not ours to pick
            raise BlockedAddress(f"{host} resolves to {blocked[0]}, a private, loopback or link-local address; "
                                 "name it in SEGGPT_ALLOWED_HOSTS (--allow-host) if it serves your images")
        return addresses

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if not parts.hostname:
            raise BlockedAddress(f"no host in {url[:200]!r}")
        self.resolve(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))


def guarded_adapter(policy: HostPolicy, on_response=None):
    """A requests adapter whose connections go only where `policy` allows (checked at connect time).

    on_response: called with the connection's socket before a response is read from it (new or pooled), so
    that a caller can cut a response that outlives its deadline (media.Watchdog)."""
    from requests.adapters import HTTPAdapter
    from urllib3.connection import HTTPConnection, HTTPSConnection
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    def connection_class(base):
        class Guarded(base):
            def _new_conn(self):
                family, address = policy.resolve(self._dns_host, self.port)[0]
                original = self._dns_host
                self._dns_host = address  # connect to the address just checked; TLS still checks self.host
                try:
                    return super()._new_conn()
                finally:
                    self._dns_host = original

            def getresponse(self, *args, **kwargs):
                if on_response is not None and self.sock is not None:
                    on_response(self.sock)
                return super().getresponse(*args, **kwargs)

        return Guarded

    class GuardedHTTPPool(HTTPConnectionPool):
        ConnectionCls = connection_class(HTTPConnection)

    class GuardedHTTPSPool(HTTPSConnectionPool):
        ConnectionCls = connection_class(HTTPSConnection)

    class GuardedAdapter(HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": GuardedHTTPPool, "https": GuardedHTTPSPool}

        def proxy_manager_for(self, *args, **kwargs):  # sessions here never use proxies (trust_env is off)
            raise BlockedAddress("proxies are not used for task images")

    return GuardedAdapter()
