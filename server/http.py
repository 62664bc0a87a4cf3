"""The HTTP edge: requests, responses, routes and the router. No domain logic.

A `Route` says everything the dispatcher needs before calling a handler: the request
model to validate the body with, whether a device token is needed, and, for paths with
`{space}`, the least role the caller must hold in that space.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs

from pydantic import BaseModel

from loft.protocol import MAX_JSON_BYTES, ErrorBody, ErrorCode, Role
from server.errors import ApiError

ROLE_RANK: dict[str, int] = {"viewer": 0, "editor": 1, "owner": 2}

Body = type[BaseModel] | Literal["binary"] | None


@dataclass(frozen=True)
class Caller:
    user_id: int
    user_name: str
    device_id: str


@dataclass
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    model: Any = None
    caller: Caller | None = None
    #: The caller's role in the space named by the path, when it names one.
    role: Role | None = None

    @property
    def user(self) -> Caller:
        assert self.caller is not None, "route declared auth=False"
        return self.caller

    def query_int(
        self, name: str, default: int | None = None, *, lo: int = 0, hi: int = 2**62
    ) -> int | None:
        values = self.query.get(name)
        if not values:
            return default
        try:
            value = int(values[-1])
        except ValueError:
            raise ApiError(400, ErrorCode.INVALID, f"query {name!r} must be an integer") from None
        if not lo <= value <= hi:
            raise ApiError(400, ErrorCode.INVALID, f"query {name!r} out of range")
        return value

    def query_str(self, name: str) -> str | None:
        values = self.query.get(name)
        return values[-1] if values else None


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def json_response(model: BaseModel, status: int = 200) -> Response:
    return Response(status, model.model_dump_json().encode())


def raw_json_response(body: bytes, status: int = 200) -> Response:
    return Response(status, body)


def error_response(err: ApiError) -> Response:
    body = ErrorBody(code=err.code, message=err.message, details=err.details)
    return Response(err.status, body.model_dump_json(exclude_none=True).encode(),
                    headers=list(err.headers))


Handler = Callable[[Any, Request], Awaitable[Response]]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: Body = None
    response: Body = None
    auth: bool = True
    #: The least role in `{space}` the caller needs (paths with `{space}` only).
    role: Role | None = None
    body_limit: int = MAX_JSON_BYTES
    query: tuple[str, ...] = ()
    status: int = 200

    @property
    def name(self) -> str:
        return self.handler.__name__


_PARAM = re.compile(r"\{(\w+)\}")


class Router:
    """Matches (method, path) against a fixed table of routes."""

    def __init__(self, routes: list[Route]) -> None:
        self.routes = routes
        self._compiled: list[tuple[re.Pattern[str], Route]] = []
        for route in routes:
            if ("{space}" in route.path) != (route.role is not None):
                raise ValueError(f"{route.path}: a {{space}} path needs a role and only it")
            pattern = _PARAM.sub(r"(?P<\1>[^/]+)", route.path)
            self._compiled.append((re.compile(f"^{pattern}$"), route))

    def match(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        allowed: list[str] = []
        for pattern, route in self._compiled:
            m = pattern.match(path)
            if m is None:
                continue
            if route.method == method:
                return route, m.groupdict()
            allowed.append(route.method)
        if allowed:
            err = ApiError(405, ErrorCode.METHOD_NOT_ALLOWED, f"{method} is not allowed here")
            err.headers = [(b"allow", ", ".join(sorted(set(allowed))).encode())]
            raise err
        raise ApiError(404, ErrorCode.NOT_FOUND, "no such endpoint")


def parse_query(raw: bytes) -> dict[str, list[str]]:
    try:
        return parse_qs(raw.decode("ascii"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, ErrorCode.INVALID, "malformed query string") from None


def validation_error(exc: Any) -> ApiError:
    """Turns a pydantic ValidationError into a 400 with a stable code."""
    errors = exc.errors(include_url=False, include_input=False)
    if any(e.get("type") == "json_invalid" for e in errors):
        return ApiError(400, ErrorCode.BAD_JSON, "body is not valid JSON")
    if any(
        "name" in str(e.get("msg", ""))
        and e.get("loc", ())
        and str(e["loc"][-1]) in ("name", "new_name")
        for e in errors
    ):
        first = next(e for e in errors if str(e["loc"][-1]) in ("name", "new_name"))
        return ApiError(400, ErrorCode.BAD_NAME, _describe(first))
    shown = "; ".join(_describe(e) for e in errors[:3])
    more = f" (+{len(errors) - 3} more)" if len(errors) > 3 else ""
    return ApiError(400, ErrorCode.INVALID, shown + more)


def _describe(error: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ())) or "body"
    return f"{loc}: {error.get('msg', 'invalid')}"


def dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
