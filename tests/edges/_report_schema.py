"""docs/report.schema.json, applied: a small validator for the JSON Schema keywords the
schema uses (type, properties, required, additionalProperties, items, prefixItems,
minItems), so the check needs no extra package."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "report.schema.json"
_TYPES = {"object": dict, "array": list, "string": str, "boolean": bool, "null": type(None)}


def _is(value: Any, kind: str) -> bool:
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, _TYPES[kind])


def errors(value: Any, schema: Any, where: str = "report") -> list[str]:
    """Every way `value` breaks `schema`, as 'path: problem' lines."""
    if schema is False:
        return [f"{where}: not allowed"]
    if schema is True:
        return []
    found: list[str] = []
    kinds = schema.get("type")
    if kinds is not None:
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not any(_is(value, k) for k in kinds):
            return [f"{where}: expected {'/'.join(kinds)}, got {type(value).__name__}"]
    if isinstance(value, dict):
        props = schema.get("properties", {})
        found += [f"{where}: missing {key!r}" for key in schema.get("required", [])
                  if key not in value]
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            sub = props.get(key, extra)
            found += errors(item, sub, f"{where}.{key}")
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        if len(value) < schema.get("minItems", 0):
            found.append(f"{where}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            sub = prefix[i] if i < len(prefix) else schema.get("items", True)
            found += errors(item, sub, f"{where}[{i}]")
    return found


def check_report(report: dict[str, Any]) -> None:
    problems = errors(report, json.loads(SCHEMA_PATH.read_text()))
    assert not problems, "\n".join(problems[:20])
