"""Protection of the console's forms against cross-site request forgery.

Three layers, any one of which stops a forged form: the browser sends the token cookie
only to the console's own pages (`SameSite=Strict`, the console's path); a change must
carry the token of that cookie in its form (a page of another site can read neither);
and a request that says it comes from another origin (`Origin`, `Sec-Fetch-Site`) is
refused whatever it carries. With a `secret`, the token is also bound to the operator
(an HMAC of the cookie and the operator's name), so a cookie planted by a sibling
subdomain is worth nothing; without one, it is the plain double-submit pattern, which
every worker process checks alike.
"""

import hashlib
import hmac
import secrets
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import Response

__all__ = ["COOKIE", "CSRFGuard"]

COOKIE = "tenancy_console_csrf"


class CSRFGuard:
    """Issues and checks the token of the console's forms. Shared by all requests; no state."""

    def __init__(self, secret: str | bytes | None = None) -> None:
        self._key = secret.encode() if isinstance(secret, str) else (secret or b"")

    def nonce(self, request: Request) -> tuple[str, bool]:
        """The browser's cookie value, or a new one; and whether it is new (to be set)."""
        current = request.cookies.get(COOKIE, "")
        if (
            32 <= len(current) <= 64
            and current.isascii()
            and current.replace("-", "").replace("_", "").isalnum()
        ):
            return current, False
        return secrets.token_urlsafe(32), True

    def token(self, nonce: str, operator: str) -> str:
        """The token a form carries for `operator` holding cookie `nonce`."""
        message = f"{nonce}\x00{operator}".encode()
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def set_cookie(self, response: Response, request: Request, nonce: str) -> None:
        """Give the browser the cookie, sent back only to the console's own paths."""
        response.set_cookie(
            COOKIE,
            nonce,
            path=(request.scope.get("root_path") or "") + "/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )

    def problem(self, request: Request, submitted: str, operator: str) -> str | None:
        """Why this change must be refused, or None when it carries a valid token from our origin."""
        site = request.headers.get("sec-fetch-site")
        if site is not None and site not in ("same-origin", "none"):
            return f"the form was sent from another site ({site})"
        origin = request.headers.get("origin")
        if origin is not None and not _same_origin(origin, request):
            return "the form was sent from another origin"
        nonce = request.cookies.get(COOKIE)
        if not nonce or not submitted:
            return "the form carries no token (are cookies enabled for this site?)"
        if not hmac.compare_digest(self.token(nonce, operator), submitted):
            return "the form's token is not valid: reload the page and try again"
        return None


def _same_origin(origin: str, request: Request) -> bool:
    # "null" (a sandboxed frame, a redirect across origins) is never ours.
    parts = urlsplit(origin)
    host = request.headers.get("host", "")
    return bool(parts.scheme in ("http", "https") and parts.netloc and parts.netloc == host)
