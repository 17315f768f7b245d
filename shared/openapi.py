"""What every service's OpenAPI document says beyond what FastAPI derives from its routes.

FastAPI documents a route's own responses and a ``422`` of the shape *it* produces. A voxelflow service
answers more than that, and a generated client or the fuzz stage (schemathesis with all its checks) holds
the service to its document, so the document must say:

* the bearer-token security every non-public operation needs;
* what the edge answers on any authenticated operation (401, 403, 408, 413; 404 where the path names a
  resource; 400 when a body cannot be decoded at all);
* the one error shape every 4xx has: ``{"detail": …}``, a string from the service, or a list of field
  errors from request validation (FastAPI's own ``HTTPValidationError`` admits only the list);
* multipart form fields as they travel: a field is a string or a file, or it is absent. Pydantic writes an
  optional form field as ``anyOf [T, null]``, and a client following that would send the text ``null``;
  a file is also ``format: binary``, which is how clients of OpenAPI 3.0 recognise one.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from fastapi import FastAPI

ERROR_SCHEMA_NAME = "Error"
ERROR_SCHEMA: dict[str, Any] = {
    "title": ERROR_SCHEMA_NAME,
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "anyOf": [
                {"type": "string", "description": "why the request was refused"},
                {
                    "type": "array",
                    "description": "request validation: one entry per invalid field",
                    "items": {
                        "type": "object",
                        "required": ["loc", "msg", "type"],
                        "properties": {
                            "loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                    },
                },
            ]
        }
    },
}
ERROR_CONTENT: dict[str, Any] = {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR_SCHEMA_NAME}"}}}

BEARER_SCHEME = "bearerAuth"
BEARER_SECURITY_SCHEME: dict[str, str] = {
    "type": "http",
    "scheme": "bearer",
    "description": "an API token (voxelflow tokens create); its role decides what it may do",
}

# What the edge itself may answer on any authenticated operation, whatever the route declares.
EDGE_RESPONSES: dict[str, str] = {
    "401": "missing, malformed, unknown or revoked token",
    "403": "the token's role may not do this",
    "408": "the request body was not received in time",
    "413": "the request body exceeds the size limit",
}
BODY_RESPONSES: dict[str, str] = {
    "400": "the body could not be decoded (not UTF-8, not JSON, broken multipart framing)",
    "422": "the request is not valid: which field and why",
}
PATH_RESOURCE_RESPONSE = ("404", "no such resource")


def _non_null(schema: dict[str, Any]) -> dict[str, Any]:
    """``anyOf [T, null]`` (with title/description beside it) as ``T`` (with them)."""
    options = schema.get("anyOf")
    if not isinstance(options, list):
        return schema
    kept = [option for option in options if option.get("type") != "null"]
    if len(kept) == len(options):
        return schema
    rest = {k: v for k, v in schema.items() if k != "anyOf" and not (k == "default" and v is None)}
    if len(kept) == 1:
        return {**kept[0], **rest}
    return {**rest, "anyOf": kept}


def _form_fields_as_sent(body_schema: dict[str, Any], components: dict[str, Any]) -> None:
    ref = body_schema.get("$ref")
    target = components.get(ref.rsplit("/", 1)[-1], {}) if isinstance(ref, str) else body_schema
    properties = target.get("properties", {})
    for name, field in list(properties.items()):
        field = _non_null(field)
        if field.get("contentMediaType") == "application/octet-stream":
            field.setdefault("format", "binary")  # a file part, as OpenAPI 3.0 clients know it
        properties[name] = field


def _complete_operation(path: str, operation: dict[str, Any], components: dict[str, Any]) -> None:
    operation.setdefault("security", [{BEARER_SCHEME: []}])
    responses = operation.setdefault("responses", {})
    codes = dict(EDGE_RESPONSES)
    body = operation.get("requestBody")
    if body:
        codes.update(BODY_RESPONSES)
        form = body.get("content", {}).get("multipart/form-data")
        if form and "schema" in form:
            _form_fields_as_sent(form["schema"], components)
    if "{" in path:
        codes.setdefault(*PATH_RESOURCE_RESPONSE)
    for code, description in codes.items():
        responses.setdefault(code, {"description": description})
    for code, response in responses.items():
        if not code.startswith("4"):
            continue
        content = response.get("content")
        # FastAPI's 422 admits only the list of field errors; a route's own 422 says why in a string.
        if content is None or code == "422":
            response["content"] = ERROR_CONTENT


def document_edge_responses(app: FastAPI, public_paths: Collection[str]) -> None:
    """Complete the app's OpenAPI document as this module's docstring says, once, when it is first built.
    ``public_paths`` need no token: they get neither the security requirement nor the edge's answers."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas[ERROR_SCHEMA_NAME] = ERROR_SCHEMA
        components.setdefault("securitySchemes", {})[BEARER_SCHEME] = BEARER_SECURITY_SCHEME
        for path, operations in schema.get("paths", {}).items():
            if path in public_paths:
                continue
            for operation in operations.values():
                _complete_operation(path, operation, schemas)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


__all__ = [
    "BEARER_SCHEME",
    "EDGE_RESPONSES",
    "ERROR_CONTENT",
    "ERROR_SCHEMA",
    "document_edge_responses",
]
