"""MkDocs hook: the REST reference, rendered from the ingress's own OpenAPI document.

The ingress's FastAPI application is built in process with no models and no Ray
(``deployments.ingress.rest.app.create_app``, as the unit tests build it), and its
``app.openapi()`` document is rendered into ``docs/api/reference.md`` where the page
holds ``MARKER``: every route with its method, summary, request body, parameters and
answers, then every schema those refer to. Built at ``mkdocs build`` time, so the page
never drifts from the code. ``tests/unit/test_docs.py`` uses ``openapi_document`` and
``render`` too.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = "<!-- keel:openapi-reference -->"
_REF = "#/components/schemas/"
_METHOD_ORDER = ("get", "post", "put", "patch", "delete")


class _NoModels:
    """A model backend with no models: enough to build the app and its document."""

    def model_names(self) -> list[str]:
        return []

    async def status(self, name: str) -> Any:
        raise LookupError(name)

    async def infer_many(self, name: str, calls: list[Any]) -> list[Any]:
        return []


def openapi_document() -> dict[str, Any]:
    """The document ``GET /openapi.json`` serves (API keys off; the 401/403 answers of the
    guarded routes are in it either way)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from deployments.ingress.rest.app import IngressConfig, create_app

    app = create_app(_NoModels(), lambda: IngressConfig())
    document: dict[str, Any] = app.openapi()
    return document


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(METHOD, path, operation) in the document's path order."""
    found = []
    for path, item in document.get("paths", {}).items():
        for method in sorted(item, key=lambda m: _METHOD_ORDER.index(m)
                             if m in _METHOD_ORDER else len(_METHOD_ORDER)):
            found.append((method.upper(), path, item[method]))
    return found


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _ref_name(schema: dict[str, Any]) -> str | None:
    ref = schema.get("$ref")
    return ref[len(_REF):] if isinstance(ref, str) and ref.startswith(_REF) else None


def _type(schema: dict[str, Any]) -> str:
    """A short type for a JSON schema: a schema name, ``list[...]``, ``a | b``..."""
    name = _ref_name(schema)
    if name:
        return f"[{name}](#{_anchor(name)})"
    for key in ("anyOf", "oneOf"):
        if key in schema:
            return " \\| ".join(_type(s) for s in schema[key])
    kind = schema.get("type")
    if kind == "array":
        return f"list[{_type(schema.get('items', {}))}]"
    if kind == "object" and isinstance(schema.get("additionalProperties"), dict):
        return f"map[str, {_type(schema['additionalProperties'])}]"
    if "enum" in schema:
        return " \\| ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    if kind == "string" and schema.get("format"):
        return f"string ({schema['format']})"
    return str(kind or "any")


def _anchor(schema_name: str) -> str:
    return "schema-" + schema_name.lower()


def _bodies(content: dict[str, Any]) -> list[str]:
    return [f"`{media}`: {_type(entry.get('schema', {}))}"
            for media, entry in content.items()]


def _referenced(schema: Any, into: set[str]) -> None:
    if isinstance(schema, dict):
        name = _ref_name(schema)
        if name:
            into.add(name)
        for value in schema.values():
            _referenced(value, into)
    elif isinstance(schema, list):
        for value in schema:
            _referenced(value, into)


def _schemas_used(document: dict[str, Any]) -> list[str]:
    """Every component schema the operations refer to, directly or through another."""
    schemas = document.get("components", {}).get("schemas", {})
    used: set[str] = set()
    _referenced(document.get("paths", {}), used)
    frontier = set(used)
    while frontier:
        more: set[str] = set()
        for name in frontier:
            _referenced(schemas.get(name, {}), more)
        frontier = more - used
        used |= more
    return sorted(n for n in used if n in schemas)


def _operation_section(method: str, path: str, op: dict[str, Any]) -> list[str]:
    lines = [f"### `{method} {path}`", ""]
    summary = op.get("summary")
    if summary:
        lines += [_cell(summary) + ".", ""]
    description = op.get("description")
    if description and description.strip() != (summary or "").strip():
        lines += [description.strip(), ""]
    parameters = op.get("parameters", [])
    if parameters:
        lines += ["| parameter | in | type | required | description |",
                  "|---|---|---|---|---|"]
        for p in parameters:
            lines.append(f"| `{p.get('name')}` | {p.get('in')} | {_type(p.get('schema', {}))} "
                         f"| {'yes' if p.get('required') else 'no'} "
                         f"| {_cell(p.get('description', ''))} |")
        lines.append("")
    body = op.get("requestBody")
    if body:
        lines += ["Request body: " + "; ".join(_bodies(body.get("content", {}))) + ".", ""]
    lines += ["| status | answer | body |", "|---|---|---|"]
    for status, answer in sorted(op.get("responses", {}).items()):
        bodies = "; ".join(_bodies(answer.get("content", {}))) or "none"
        lines.append(f"| {status} | {_cell(answer.get('description', ''))} | {bodies} |")
    lines.append("")
    return lines


def _schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    lines = [f"### {name} {{ #{_anchor(name)} }}", ""]
    if schema.get("description"):
        lines += [_cell(schema["description"]), ""]
    properties = schema.get("properties", {})
    if not properties:
        lines += [f"Type: {_type(schema)}.", ""]
        return lines
    required = set(schema.get("required", []))
    lines += ["| field | type | required | default | description |", "|---|---|---|---|---|"]
    for field, spec in properties.items():
        default = f"`{json.dumps(spec['default'])}`" if "default" in spec else ""
        lines.append(f"| `{field}` | {_type(spec)} | {'yes' if field in required else 'no'} "
                     f"| {_cell(default)} | {_cell(spec.get('description', ''))} |")
    lines.append("")
    return lines


def _name_inline_bodies(document: dict[str, Any]) -> dict[str, Any]:
    """A copy in which every inline body schema with a title (a route that declares its
    body by hand, e.g. ``DecideRequest``) is a named component, so it is listed too."""
    document = copy.deepcopy(document)
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    for _, _, op in operations(document):
        contents = [op.get("requestBody", {}).get("content", {})]
        contents += [answer.get("content", {}) for answer in op.get("responses", {}).values()]
        for content in contents:
            for entry in content.values():
                schema = entry.get("schema", {})
                title = schema.get("title")
                if title and "properties" in schema and "$ref" not in schema:
                    schemas.setdefault(title, schema)
                    entry["schema"] = {"$ref": _REF + title}
    return document


def render(document: dict[str, Any]) -> str:
    """The reference as markdown: an index table, one section per operation, the schemas."""
    document = _name_inline_bodies(document)
    ops = operations(document)
    lines = ["| method | path | summary | answers |", "|---|---|---|---|"]
    for method, path, op in ops:
        statuses = ", ".join(sorted(op.get("responses", {})))
        anchor = f"{method} {path}".lower()
        lines.append(f"| {method} | [`{path}`](#{_slug(anchor)}) | {_cell(op.get('summary', ''))} "
                     f"| {statuses} |")
    lines += ["", "## Routes", ""]
    for method, path, op in ops:
        lines += _operation_section(method, path, op)
    schemas = document.get("components", {}).get("schemas", {})
    lines += ["## Schemas", ""]
    for name in _schemas_used(document):
        lines += _schema_section(name, schemas[name])
    return "\n".join(lines)


def _slug(text: str) -> str:
    """The id Python-Markdown's toc extension gives a heading of ``text`` (in backticks)."""
    value = unicodedata.normalize("NFKD", text)
    value = re.sub(r"[^\w\s-]", "", value).strip().lower()
    return re.sub(r"[-\s]+", "-", value)


def paths_in(markdown: str) -> set[str]:
    """The ``METHOD path`` headings a rendered page holds (for the docs test)."""
    return {line[len("### `"):-1] for line in markdown.splitlines()
            if line.startswith("### `") and line.endswith("`")}


def route_keys(document: dict[str, Any]) -> Iterable[str]:
    return (f"{method} {path}" for method, path, _ in operations(document))


# --- MkDocs event ------------------------------------------------------------------------

_cache: dict[str, str] = {}


def on_pre_build(config: Any) -> None:
    _cache.clear()  # `mkdocs serve` rebuilds: render the current code again


def on_page_markdown(markdown: str, page: Any, config: Any, files: Sequence[Any]) -> str:
    if MARKER not in markdown:
        return markdown
    if "reference" not in _cache:
        _cache["reference"] = render(openapi_document())
    return markdown.replace(MARKER, _cache["reference"])
