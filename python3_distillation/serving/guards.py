"""Safe by default on a laptop: which Host headers and request bodies the server accepts.

    curl -s -H 'Host: evil.example' localhost:6006/health     # 421: not a name this server answers to

* **Host allow-list.** A web page the user visits can point its own domain at 127.0.0.1 (DNS
  rebinding) and then talk to this server as "same origin"; its requests carry that domain in
  ``Host``. Accepted: loopback names (``localhost``, ``127.0.0.1``, ``::1``), the bind address, and
  ``ServeConfig.allowed_hosts`` (``*`` accepts any). With a wildcard bind (``0.0.0.0`` / ``::``,
  as in the Docker images) any IP address and any single-label name (a compose service ``backend``,
  a Kubernetes short name) are accepted too: rebinding needs a domain the attacker registered, which
  has a dot. Other names (``backend.ns.svc.cluster.local``) go in the allow-list. Others → 421.
* **JSON bodies only.** A page can POST ``text/plain`` to any address without a CORS preflight;
  ``application/json`` needs one, which this server never grants. So POST requires
  ``Content-Type: application/json`` (415 otherwise).
"""

from __future__ import annotations

import ipaddress

from flask import request

from python3_distillation.serving.errors import ApiError
from python3_distillation.serving.settings import ServeConfig

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "*"})


def host_name(header: str) -> str:
    """``Host`` header → the name without port or brackets, lowercased."""
    h = header.strip().lower()
    if h.startswith("["):  # [::1]:6006
        return h[1:h.find("]")] if "]" in h else h
    if h.count(":") == 1:
        h = h.rsplit(":", 1)[0]
    return h.rstrip(".")


class HostAllowList:
    def __init__(self, config: ServeConfig):
        binds = [host_name(b) for b in config.host.split(",")]
        self.any_host = "*" in config.allowed_hosts
        self.any_ip = any(b in WILDCARD_BINDS for b in binds)
        self.names = LOOPBACK_NAMES | {b for b in binds if b not in WILDCARD_BINDS} | {
            host_name(h) for h in config.allowed_hosts}

    def allows(self, header: str | None) -> bool:
        if self.any_host:
            return True
        if not header:
            return False
        name = host_name(header)
        if name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback or self.any_ip
        except ValueError:  # a name: with a wildcard bind, single-label ones (a compose service) pass
            return self.any_ip and "." not in name and bool(name)


def check_request(allow: HostAllowList) -> None:
    """Before every request: the Host allow-list, then JSON bodies for POST."""
    host = request.headers.get("Host")
    if not allow.allows(host):
        raise ApiError(421, f"this server does not answer to the host {str(host)[:100]!r}; add it to "
                            "DISTILL_ALLOWED_HOSTS (or --allowed-host) to allow it", "misdirected_request")
    if request.method == "POST" and request.mimetype != "application/json":
        raise ApiError(415, f"POST bodies must be JSON with Content-Type: application/json, got "
                            f"{(request.mimetype or 'none')[:100]!r}", "unsupported_media_type")
