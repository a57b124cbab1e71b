"""The dashboard's web server: the pages, their event streams (server-sent events: a page is sent
its main section again when the view changed, at most every PUSH_EVERY seconds), and the static
files, Plotly's JS included, from the `plotly` package (nothing is fetched from the internet).

Access: on loopback, no login. With a token (always when serving beyond loopback), every request
needs the login cookie, set by opening any page once with ?token=TOKEN; anything else gets 401."""

from __future__ import annotations

import asyncio
import gzip
import hmac
import ipaddress
import json
import secrets
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from swarmlearn.errors import ConfigError
from swarmlearn.ui import pages
from swarmlearn.ui.view import SwarmView

STATIC = Path(__file__).parent / "static"
PUSH_EVERY = 0.1  # how often a stream looks whether the view changed (in process: a number compared)
KEEPALIVE_EVERY = 15.0  # a comment line on a quiet stream, so that proxies keep it open
COOKIE = "swarm_ui_token"
LOOPBACK_NAMES = ("localhost",)
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Access:
    """token: None serves everyone (loopback only); else the login token. secure: served over HTTPS."""

    token: str | None = None
    secure: bool = False

    @classmethod
    def for_host(cls, host: str, require_token: bool, tls: bool) -> Access:
        if not is_loopback(host) and not tls:
            raise ConfigError(f"--host {host} serves beyond loopback: that needs HTTPS with the ui certificate; give "
                              f"--cert and --key of a ui identity (made by `swarm gen-cert`)")
        needs_token = require_token or not is_loopback(host)
        return cls(secrets.token_urlsafe(24) if needs_token else None, tls)


class TokenGate:
    """ASGI middleware: with a token, a request passes with the login cookie; ?token=TOKEN sets the
    cookie and redirects to the same page without it (so that the token leaves the address bar)."""

    def __init__(self, app, access: Access):
        self.app = app
        self.access = access

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.access.token is None:
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = parse_qs(scope.get("query_string", b"").decode()).get("token", [""])[0]
        if given and self._matches(given):
            kept = {k: v for k, v in request.query_params.items() if k != "token"}
            target = request.url.path + ("?" + "&".join(f"{k}={v}" for k, v in kept.items()) if kept else "")
            response = RedirectResponse(target, status_code=303)
            response.set_cookie(COOKIE, self.access.token, httponly=True, samesite="strict", secure=self.access.secure)
            return await response(scope, receive, send)
        if self._matches(request.cookies.get(COOKIE, "")):
            return await self.app(scope, receive, send)
        refused = PlainTextResponse("401: this dashboard needs its login token: open the URL `swarm ui` printed "
                                    "(it ends in ?token=...)", status_code=401)
        return await refused(scope, receive, send)

    def _matches(self, given: str) -> bool:
        return hmac.compare_digest(given.encode(), self.access.token.encode())


@cache
def _plotly_js() -> tuple[bytes, bytes]:
    """Plotly's bundled JS, plain and gzipped (once: 4.8 MB compress to about 1.4 MB)."""
    import plotly

    data = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_bytes()
    return data, gzip.compress(data, 6)


def _page_number(request: Request) -> int:
    try:
        return max(0, int(request.query_params.get("p", "0")))
    except ValueError:
        return 0


def make_app(view: SwarmView, access: Access) -> Starlette:
    def page_route(name: str):
        async def render(request: Request) -> Response:
            return HTMLResponse(pages.full_page(view, name, _page_number(request)), headers=SECURITY_HEADERS)
        return render

    async def events(request: Request) -> Response:
        page = request.query_params.get("page", "swarm")
        if page not in pages.PAGES:
            return PlainTextResponse(f"unknown page {page!r}; one of {', '.join(pages.PAGES)}", status_code=404)
        return StreamingResponse(_stream(view, request, page, _page_number(request)), media_type="text/event-stream",
                                 headers={"cache-control": "no-store", "x-accel-buffering": "no"})

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        long_cache = {"cache-control": "public, max-age=86400"}
        if name == "plotly.min.js":
            plain, packed = _plotly_js()
            if "gzip" in request.headers.get("accept-encoding", ""):
                return Response(packed, media_type="text/javascript",
                                headers={**long_cache, "content-encoding": "gzip", "vary": "accept-encoding"})
            return Response(plain, media_type="text/javascript", headers=long_cache)
        kinds = {"ui.css": "text/css", "ui.js": "text/javascript"}
        if name not in kinds:
            return PlainTextResponse("not found", status_code=404)
        return Response((STATIC / name).read_bytes(), media_type=kinds[name], headers={"cache-control": "no-cache"})

    routes = [Route("/" if name == "swarm" else f"/{name}", page_route(name)) for name in pages.PAGES]
    routes += [Route("/events", events), Route("/static/{name}", static)]
    app = Starlette(routes=routes)
    app.add_middleware(TokenGate, access=access)
    return app


async def _stream(view: SwarmView, request: Request, page: str, number: int):
    """The page's update each time the view changed (the page drew the state it was served with;
    one update goes at once, in case the view moved between the two requests)."""
    sent = None
    quiet = 0.0
    while not await request.is_disconnected():
        if view.version != sent:
            update = pages.update(view, page, number)
            sent = update["version"]
            quiet = 0.0
            yield f"event: update\ndata: {json.dumps(update)}\n\n"
        elif quiet >= KEEPALIVE_EVERY:
            quiet = 0.0
            yield ": still here\n\n"
        await asyncio.sleep(PUSH_EVERY)
        quiet += PUSH_EVERY
