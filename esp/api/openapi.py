"""The OpenAPI 3.1 document of the management API, written from the endpoint declarations
(:data:`esp.api.framework.OPERATIONS`) and the pydantic models they name."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from esp.api.framework import INT_MAX, OPERATIONS, Operation, path_parameters
from esp.api.models import ErrorOut

_REF = "#/components/schemas/{model}"
_REASONS = {
    400: "The request is malformed or a field is invalid (details.fields names it)",
    401: "No valid token or API key",
    403: "The caller may not do this",
    404: "No such resource",
    409: "Conflicts with the current state",
    413: "The request body is too large",
    415: "The body is not application/json",
    422: "Understood, but refused",
    429: "Too many attempts; try again later",
    503: "A dependency (the database) is unavailable; try again later",
}


def _openapi_path(rule: str) -> str:
    for name, converter in path_parameters(rule):
        for spelled in (f"<{converter}:{name}>", f"<{name}>"):
            rule = rule.replace(spelled, "{" + name + "}")
    return rule


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent rather than null: drop the null alternative."""
    options = schema.get("anyOf")
    if not options:
        return schema
    rest = [o for o in options if o.get("type") != "null"]
    kept = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    if len(rest) == 1:
        return {**rest[0], **kept}
    return {**kept, "anyOf": rest}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    schema = model.model_json_schema(ref_template=_REF)
    required = set(schema.get("required", ()))
    return [
        {"name": name, "in": "query", "required": name in required,
         "schema": _without_null(prop)}
        for name, prop in schema.get("properties", {}).items()
    ]


def _path_parameters(rule: str) -> list[dict[str, Any]]:
    parameters = []
    for name, converter in path_parameters(rule):
        schema: dict[str, Any] = (
            {"type": "integer", "minimum": 0, "maximum": INT_MAX} if converter == "int"
            else {"type": "string", "minLength": 1, "pattern": "^[^/]+$"})
        parameters.append({"name": name, "in": "path", "required": True, "schema": schema})
    return parameters


def _operation(op: Operation, refs: Mapping[tuple[Any, JsonSchemaMode], Any]) -> dict[str, Any]:
    responses: dict[str, Any] = {}
    if op.response is not None:
        responses[str(op.status)] = {
            "description": op.summary,
            "content": {"application/json": {
                "schema": refs[(op.response, "serialization")]}},
        }
    elif op.response_types:
        responses[str(op.status)] = {
            "description": op.summary,
            "content": {t: {"schema": {"type": "string"}} for t in op.response_types},
        }
    else:
        responses[str(op.status)] = {"description": op.summary}
    for status in op.errors:
        responses[str(status)] = {"$ref": f"#/components/responses/E{status}"}
    operation: dict[str, Any] = {
        "operationId": op.name, "summary": op.summary, "tags": [op.tag],
        "parameters": _path_parameters(op.path)
        + (_query_parameters(op.query) if op.query is not None else []),
        "responses": responses,
    }
    if op.description:
        operation["description"] = op.description
    if op.scope is not None:
        operation["x-scope"] = op.scope
    if op.public:
        operation["security"] = []
    if op.body is not None:
        content = {"application/json": {"schema": refs[(op.body, "validation")]}}
        for media in op.body_types:
            content[media] = {"schema": {"type": "object", "properties": {
                "message": {"type": "string", "description": "the JSON request"}}}}
        operation["requestBody"] = {"required": True, "content": content}
    return operation


def document(version: str) -> dict[str, Any]:
    wanted: dict[tuple[type[BaseModel], JsonSchemaMode], None] = {
        (ErrorOut, "serialization"): None}
    for op in OPERATIONS:
        if op.body is not None:
            wanted[(op.body, "validation")] = None
        if op.response is not None:
            wanted[(op.response, "serialization")] = None
    refs, definitions = models_json_schema(list(wanted), ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for op in OPERATIONS:
        paths.setdefault(_openapi_path(op.path), {})[op.method.lower()] = _operation(
            op, refs)
    error = refs[(ErrorOut, "serialization")]
    return {
        "openapi": "3.1.0",
        "info": {"title": "ESP management API", "version": version,
                 "description": "Domains, users, aliases, mailboxes, messages, sending, the "
                                "outbound queue, webhooks, DKIM keys and the audit log of "
                                "an ESP server. Every error is "
                                '{"error": {"code", "message", "details"}}.'},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": definitions.get("$defs", {}),
            "securitySchemes": {"bearer": {
                "type": "http", "scheme": "bearer",
                "description": "An access token from /api/v1/auth/token, or an API key "
                               "(esp_...)"}},
            "responses": {
                f"E{status}": {"description": reason,
                               "content": {"application/json": {"schema": error}}}
                for status, reason in _REASONS.items()
            },
        },
        "security": [{"bearer": []}],
    }
