"""The web console: `GET /` and `/ui` (the page), `/ui/<asset>` (its scripts and styles).

Plain files from `api/static/`, read once when the app is made and served from memory; the
page calls the same public API as any client (`/v1/models`, `/v1/chat/completions`,
`/v1/stats`), so the API key check applies to its calls while the page itself is public.
`--disable-ui` leaves this blueprint out.
"""

from __future__ import annotations

from importlib import resources

from quart import Blueprint, Response

from api.errors import ApiError

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; frame-ancestors 'none'"
)
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
PAGE = "index.html"
# NOTE: the page's (and the assets') headers: no inline script or style runs, nothing is
# framed or sniffed, and a new version of the files is fetched after a restart.
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def static_files() -> dict[str, tuple[bytes, str]]:
    """Every shipped asset by file name: (content, content type)."""
    folder = resources.files("api") / "static"
    files = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1]
        if entry.is_file() and suffix in CONTENT_TYPES:
            files[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return files


def console_blueprint() -> Blueprint:
    files = static_files()
    console = Blueprint("console", __name__)

    def serve(name: str) -> Response:
        if name not in files:
            raise ApiError(404, f"No such console file: `{name}`.")
        body, content_type = files[name]
        return Response(body, 200, SECURITY_HEADERS, content_type=content_type)

    @console.get("/")
    async def page():
        return serve(PAGE)

    @console.get("/ui")
    @console.get("/ui/")
    async def page_alias():
        return serve(PAGE)

    @console.get("/ui/<name>")
    async def asset(name: str):
        return serve(name)

    return console
