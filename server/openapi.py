"""The OpenAPI document, generated from the routing table and the pydantic models."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from loft.protocol import ErrorBody
from server.http import Request, Response, Route


def build(routes: list[Route]) -> dict[str, Any]:
    models: set[type[BaseModel]] = {ErrorBody}
    for route in routes:
        for body in (route.body, route.response):
            if isinstance(body, type):
                models.add(body)
    ordered = sorted(models, key=lambda m: m.__name__)
    _, schema = models_json_schema(
        [(m, "validation") for m in ordered], ref_template="#/components/schemas/{model}"
    )
    components = schema.get("$defs", {})
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op: dict[str, Any] = {"operationId": route.name, "summary": route.summary}
        params = [
            {"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
            for p in _path_params(route.path)
        ]
        params += [
            {"name": q, "in": "query", "required": False, "schema": {"type": "string"}}
            for q in route.query
        ]
        if params:
            op["parameters"] = params
        if route.body is not None:
            op["requestBody"] = {"required": True, "content": _content(route.body)}
        ok: dict[str, Any] = {"description": "success"}
        if route.response is not None:
            ok["content"] = _content(route.response)
        op["responses"] = {str(route.status): ok, "4XX": {"description": "error", "content": error}}
        if route.auth:
            op["security"] = [{"device": []}]
        if route.role:
            op["x-loft-role"] = route.role
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Loft", "version": "1"},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"device": {"type": "http", "scheme": "bearer"}},
        },
    }


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _content(body: Any) -> dict[str, Any]:
    if body == "binary":
        return {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{body.__name__}"}}}


async def document(ctx, req: Request) -> Response:
    return Response(200, ctx.openapi)


async def health(ctx, req: Request) -> Response:
    return Response(200, json.dumps({"ok": True}).encode())
