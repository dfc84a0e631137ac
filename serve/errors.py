"""Errors in the client's terms: the API error, message cleaning, the Host policy and the
mapping of a model deployment's failures, plus the FastAPI handlers that turn each into JSON.

Every error is JSON ``{"error": …}`` with the status codes of docs/ARCHITECTURE.md ("HTTP
API"): one cleaned line, never a stack trace, a replica's name or terminal colours. The Host
header must name this server (its own address, or one of ``ingress.allowed_hosts``; 421
otherwise), so a web page cannot reach a loopback server by DNS rebinding; the ingress and the
health app apply the same check (:func:`request_host_allowed`).
"""

import hmac
import logging
import re
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException

from carclf.errors import UserInputError

log = logging.getLogger("ray.serve")
WRONG_HOST = "this server does not answer for that Host header"


class ApiError(Exception):
    """An error response: HTTP status, a one-line message for the client and extra headers.

    ``kind`` marks a refused image or body (one of :data:`serve.metrics.DECODE_ERROR_KINDS`),
    counted in ``carclf_decode_errors``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        headers: dict[str, str] | None = None,
        kind: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.kind = kind


# Terminal colour codes and other control characters never belong in a client's message.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]+")


def clean_message(text: str, limit: int = 300) -> str:
    """A message fit for a client: its first line, without control characters, cut short."""
    lines = _ANSI.sub("", text).strip().splitlines()
    line = _CONTROL.sub(" ", lines[0] if lines else "").strip()
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _hostname(value: str) -> str | None:
    """The name in a ``Host`` header (no port, no IPv6 brackets, lower case), or None."""
    try:
        return urlsplit("//" + value).hostname
    except ValueError:  # e.g. an unclosed "[" of an IPv6 literal
        return None


def host_allowed(host: str | None, server: str | None, allowed: list[str]) -> bool:
    """Whether a request's ``Host`` header names this server.

    Args:
        host: the ``Host`` header, None when absent or repeated.
        server: the address the request arrived on (the proxy's own), always allowed.
        allowed: names from ``ingress.allowed_hosts``: exact, ``*`` or ``*.domain``.
    """
    name = _hostname(host) if host else None
    if not name:
        return False
    for pattern in [*allowed, *([server] if server else [])]:
        pattern = pattern.strip().strip("[]").lower()
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


def request_host_allowed(request: Request, allowed: list[str]) -> bool:
    """:func:`host_allowed` for a request: exactly one ``Host`` header, naming this server."""
    hosts = request.headers.getlist("host")
    server = request.scope.get("server")
    return host_allowed(
        hosts[0] if len(hosts) == 1 else None, server[0] if server else None, allowed
    )


def authorise(request: Request, allowed_hosts: list[str], api_key: str | None) -> None:
    """The request policy that needs no body: the Host allow-list (421), then, where
    ``api_key`` is set, exactly one matching ``x-api-key`` header (401)."""
    if not request_host_allowed(request, allowed_hosts):
        raise ApiError(421, WRONG_HOST)
    if not api_key:
        return
    # Exactly one header: with two ("right, wrong"), which one a proxy checks is a guess.
    sent = request.headers.getlist("x-api-key")
    # Bytes, not str: compare_digest refuses non-ASCII str, and headers arrive as latin-1.
    if len(sent) != 1 or not hmac.compare_digest(sent[0].encode("latin-1"), api_key.encode()):
        raise ApiError(401, "missing, repeated or wrong API key (send one x-api-key header)")


def client_error(exc: BaseException, what: str, retry: dict[str, str]) -> BaseException:
    """A deployment call's failure in the client's terms (an :class:`ApiError`), else ``exc``.

    Ray wraps an exception raised in a replica in a ``RayTaskError`` whose text carries the
    replica's actor name, a traceback and terminal colours: only the cause's own message
    (a :class:`UserInputError`'s) goes back to the client.
    """
    if isinstance(exc, BackPressureError):
        return ApiError(503, f"{what} is busy; retry shortly", retry)
    if isinstance(exc, (RayActorError, DeploymentUnavailableError)):
        return ApiError(503, f"{what} is restarting; retry shortly", retry)
    if isinstance(exc, RayTaskError) and isinstance(exc.cause, UserInputError):
        return ApiError(422, str(exc.cause))
    return exc


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse(
        {"error": clean_message(exc.message)}, status_code=exc.status, headers=exc.headers
    )


async def _http_error(_: Request, exc: HTTPException) -> JSONResponse:
    return JSONResponse(
        {"error": clean_message(str(exc.detail))},
        status_code=exc.status_code,
        headers=getattr(exc, "headers", None),
    )


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # A bug on our side: say so without a stack trace; the replica log gets the details.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"error": "internal error"}, status_code=500)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": "malformed request"}, status_code=422)


def install_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises as JSON ``{"error": …}``."""
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    app.add_exception_handler(RequestValidationError, _validation_error)
