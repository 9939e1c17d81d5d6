"""Who may use ``geoagent serve``: the Host check, the cross-site check and the token, as one ASGI middleware.

- **Host** (every bind): only the names this server answers to (the bound host, ``localhost``, ``127.0.0.1``,
  ``[::1]``, the configured ``[serve] allowed_hosts``; on an every-address bind also this computer's name and
  any IP address). A DNS-rebinding page reaches the server under the attacker's own name, so it gets 400.
- **Cross-site** (every bind): a request another site's page makes (its ``Origin`` is not this server's, or
  ``Sec-Fetch-Site`` says cross-site or same-site) is refused (403) unless it carries the token as a bearer
  header; top-level navigations (a link to the page) are let through to the token check.
- **Token** (non-loopback binds, or wherever ``[serve] token_env`` sets one): ``Authorization: Bearer TOKEN``,
  or the HttpOnly SameSite=Strict cookie the page gets when it is first opened with ``?token=TOKEN`` (that
  visit is redirected to the same address without the token). Missing or wrong: 401.
"""

from __future__ import annotations

import hmac
import ipaddress
import re
import socket
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import parse_qsl, urlencode, urlsplit

from starlette.datastructures import Headers
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")
TOKEN_PARAM = "token"  # the query parameter of the printed URL
COOKIE_PREFIX = "geoagent-token-"  # + the port: cookies are shared by every port of a host
CROSS_ORIGIN = "cross-origin requests are refused: use the page this server serves"
_NAME = re.compile(r"[a-z0-9_]([a-z0-9_.-]*[a-z0-9_])?")
_SAFE_NAVIGATION = ("GET", "HEAD")


def canonical_host(host: str) -> str | None:
    """``host`` (a name or an IP address, IPv6 with or without brackets) as the Host check compares it:
    lowercase, no trailing dot, IP addresses in their short form, IPv6 in brackets; None when it is neither."""
    value = host.strip().lower().rstrip(".")
    bare = value[1:-1] if value.startswith("[") and value.endswith("]") else value
    try:
        address = ipaddress.ip_address(bare)
    except ValueError:
        return value if bare == value and _NAME.fullmatch(value) else None
    return f"[{address}]" if address.version == 6 else str(address)


def split_host_header(value: str) -> str | None:
    """The canonical host of a ``Host`` header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``); None if malformed."""
    value = value.strip()
    if value.startswith("["):
        end = value.find("]")
        host, rest = value[: end + 1], value[end + 1 :]
        if end < 0 or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
    else:
        host, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    return canonical_host(host) if host else None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def is_every_address(host: str) -> bool:
    """True for 0.0.0.0 and :: (every interface)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


@dataclass(frozen=True)
class Access:
    """What the guard lets in: the hosts it answers to, and the token (None: no token is asked)."""

    hosts: frozenset[str]
    any_ip: bool = False  # every-address bind: any IP-address Host (a rebinding page always has a name)
    token: str | None = field(default=None, repr=False)

    @classmethod
    def plan(cls, bound_host: str, allowed_hosts: list[str] | tuple[str, ...] = (), token: str | None = None) -> Access:
        """The access for a server bound to ``bound_host``, answering also to ``allowed_hosts``."""
        names = [*LOOPBACK_HOSTS, *allowed_hosts]
        every = is_every_address(bound_host)
        if every:
            names.append(socket.gethostname())
        else:
            names.append(bound_host)
        hosts = frozenset(h for h in map(canonical_host, names) if h)
        return cls(hosts=hosts, any_ip=every, token=token)

    def allows_host(self, host: str | None) -> bool:
        return host is not None and (host in self.hosts or (self.any_ip and _is_ip(host)))

    def token_matches(self, given: str | None) -> bool:
        """Constant-time comparison with the token (always False when none is set or none was given)."""
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), self.token.encode("utf-8"))


class Guard:
    """ASGI middleware enforcing :class:`Access` on every HTTP request (see the module's docstring)."""

    def __init__(self, app: ASGIApp, access: Access) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.check(scope)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        await refusal(scope, receive, send)

    def check(self, scope: Scope) -> Response | None:
        """The response refusing this request, or None to let it through."""
        headers = Headers(scope=scope)
        host_header = headers.get("host", "")
        if not self.access.allows_host(split_host_header(host_header)):
            return _refuse(scope, 400, "invalid host header: this server answers only to its own names ([serve] allowed_hosts)")
        bearer = _bearer(headers)
        bearer_ok = self.access.token_matches(bearer)
        if _cross_site(scope, headers, host_header) and not bearer_ok:
            return _refuse(scope, 403, CROSS_ORIGIN)
        if self.access.token is None or bearer_ok:
            return None
        cookie = _cookie(headers, _cookie_name(scope))
        if self.access.token_matches(cookie):
            return None
        query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1")))
        if scope["method"] in _SAFE_NAVIGATION and self.access.token_matches(query.get(TOKEN_PARAM)):
            return self._set_cookie(scope, query)
        if bearer is not None or cookie is not None:
            return _refuse(scope, 401, "wrong token: use the URL or token geoagent serve printed when it started")
        return _refuse(scope, 401, "this server needs its token: open the URL geoagent serve printed (it ends in ?token=...), "
                                   "or send Authorization: Bearer TOKEN")

    def _set_cookie(self, scope: Scope, query: dict[str, str]) -> Response:
        """The first visit with ``?token=``: the token becomes a cookie and the address loses it (history, screen)."""
        rest = urlencode({k: v for k, v in query.items() if k != TOKEN_PARAM})
        target = scope.get("root_path", "") + scope["path"] + (f"?{rest}" if rest else "")
        response = RedirectResponse(target, status_code=303, headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"})
        assert self.access.token is not None
        response.set_cookie(_cookie_name(scope), self.access.token, httponly=True, samesite="strict", path="/")
        return response


def _bearer(headers: Headers) -> str | None:
    scheme, _, value = headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _cookie_name(scope: Scope) -> str:
    server = scope.get("server") or ("", 0)
    return f"{COOKIE_PREFIX}{server[1] or 0}"


def _cookie(headers: Headers, name: str) -> str | None:
    jar = SimpleCookie()
    for value in headers.getlist("cookie"):
        try:
            jar.load(value)
        except CookieError:
            continue
    morsel = jar.get(name)
    return morsel.value if morsel is not None else None


def _cross_site(scope: Scope, headers: Headers, host_header: str) -> bool:
    """True for a request another site's page made: an Origin other than this very server, or a browser's
    Sec-Fetch-Site saying so. A top-level navigation to the page (a followed link) is not refused here."""
    origin = headers.get("origin")
    if origin is not None:
        parts = urlsplit(origin)
        if origin == "null" or parts.scheme not in ("http", "https") or parts.netloc.lower() != host_header.strip().lower():
            return True
    site = headers.get("sec-fetch-site")
    if site in ("cross-site", "same-site"):
        navigation = headers.get("sec-fetch-mode") == "navigate" and scope["method"] in _SAFE_NAVIGATION
        return not navigation
    return False


def _refuse(scope: Scope, status: int, message: str) -> Response:
    """The refusal as the API's JSON error, or as text for anything else (the page, its files)."""
    extra = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    if scope["path"].startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status, headers=extra)
    return PlainTextResponse(message + "\n", status_code=status, headers=extra)
