"""The ``Host`` header check in front of every route (DNS rebinding).

The request body limit is FastAPI's own ``max_body_size`` (Content-Length checked before the body is read, the
streamed bytes counted as they arrive), set in :func:`lora_scripts.service.app.create_app`.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
from typing import Any

from .security import is_loopback

# probes are answered whatever the Host (kubelet sends the pod IP, a load balancer its own name); they reveal nothing
OPEN_PATHS = ("/healthz", "/readyz")
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def host_without_port(header: str) -> str:
    """``example.com:7860`` -> ``example.com``; ``[::1]:7860`` -> ``::1``; lower case."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:header.find("]")] if "]" in header else header
    if header.count(":") == 1:
        return header.split(":", 1)[0]
    return header


class AllowedHosts:
    """Which ``Host`` headers this server answers: ``localhost``, the bound address, and the operator's names
    (``--allowed-host``; ``*.example.com`` wildcards). An IP literal is allowed when the server listens on it, or on
    every address (0.0.0.0): a DNS rebinding attack needs the attacker's *name* in the header, never an IP."""

    def __init__(self, bind_host: str, names: list[str] | tuple[str, ...] = ()) -> None:
        self.bind = bind_host.strip("[]").lower()
        self.names = {"localhost", *(n.strip().lower() for n in names if n.strip())}
        if _ip(self.bind) is None and self.bind not in WILDCARD_BINDS:
            self.names.add(self.bind)

    def allows(self, header: str | None) -> bool:
        """True if a request carrying this ``Host`` header may be answered."""
        if not header:
            return False
        host = host_without_port(header)
        if host in self.names or any(fnmatch.fnmatchcase(host, n) for n in self.names if "*" in n):
            return True
        ip = _ip(host)
        if ip is None:
            return False
        if self.bind in WILDCARD_BINDS:
            return True
        return ip == _ip(self.bind) or (ip.is_loopback and is_loopback(self.bind))


async def _send_json(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class HostCheckMiddleware:
    """Refuse (400) a request whose ``Host`` is not one of :class:`AllowedHosts` (a web page that rebound its own
    name to 127.0.0.1 would otherwise read the API with the victim's cookie)."""

    def __init__(self, app: Any, allowed: AllowedHosts) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") not in OPEN_PATHS:
            header = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
            if not self.allowed.allows(header):
                await _send_json(send, 400, f"Host {header!r} is not served here; start the server with "
                                 f"--allowed-host {host_without_port(header) or 'NAME'} to allow that name")
                return
        await self.app(scope, receive, send)
