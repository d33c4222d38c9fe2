"""The committed JSON Schema is current, and rollouts.yaml points at it and fits it."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.config import export_schema

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_PATH = ROOT / "schema" / "rollouts.schema.json"
EXAMPLE = ROOT / "rollouts.yaml"

# Keywords the small validator below understands, and annotations it may ignore. Any other
# keyword in the schema fails the test instead of being silently skipped.
_CHECKED = {
    "$ref", "additionalProperties", "anyOf", "enum", "items", "maximum", "minItems",
    "minProperties", "minimum", "pattern", "properties", "required", "type",
}  # fmt: skip
_ANNOTATIONS = {"$defs", "$schema", "default", "description", "title"}
_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
}


def schema_errors(
    value: Any, schema: dict[str, Any], root: dict[str, Any], at: str = ""
) -> list[str]:
    """Violations of the JSON Schema subset pydantic emits (no `jsonschema` dependency)."""
    unknown = set(schema) - _CHECKED - _ANNOTATIONS
    assert not unknown, f"{at or '(root)'}: the test validator does not know {unknown}"
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        return schema_errors(value, root["$defs"][name], root, at)
    if "anyOf" in schema:
        options = [schema_errors(value, option, root, at) for option in schema["anyOf"]]
        return [] if any(not o for o in options) else [f"{at}: matches no option: {options}"]
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None and not _TYPES[kind](value):
        return [f"{at}: {value!r} is not of type {kind}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{at}: {value!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
        errors.append(f"{at}: {value!r} does not match {schema['pattern']}")
    if _TYPES["number"](value):
        if "minimum" in schema and value < schema["minimum"]:
            errors.append(f"{at}: {value} < {schema['minimum']}")
        if "maximum" in schema and value > schema["maximum"]:
            errors.append(f"{at}: {value} > {schema['maximum']}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{at}: fewer than {schema['minItems']} items")
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), root, f"{at}[{i}]")
    if isinstance(value, dict):
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{at}: fewer than {schema['minProperties']} properties")
        errors += [
            f"{at}.{key}: required" for key in schema.get("required", []) if key not in value
        ]
        properties = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            where = f"{at}.{key}" if at else str(key)
            if key in properties:
                errors += schema_errors(item, properties[key], root, where)
            elif extra is False:
                errors.append(f"{where}: not allowed")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, root, where)
    return errors


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def test_committed_schema_is_current() -> None:
    """schema/rollouts.schema.json is exactly what the models export today."""
    committed = SCHEMA_PATH.read_text(encoding="utf-8")
    assert committed == export_schema(), (
        "schema/rollouts.schema.json is stale: the config models changed. Run `make schema` "
        "and commit the result."
    )


def test_example_points_editors_at_the_schema() -> None:
    """The first line of rollouts.yaml tells yaml-language-server where the schema is."""
    first = EXAMPLE.read_text(encoding="utf-8").splitlines()[0]
    assert first == "# yaml-language-server: $schema=./schema/rollouts.schema.json"
    assert (EXAMPLE.parent / "schema" / "rollouts.schema.json").is_file()


def test_schema_describes_the_whole_file(schema: dict[str, Any]) -> None:
    """The schema is a draft 2020-12 object schema that forbids unknown keys at the top."""
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"upstreams", "routes"}


def test_example_validates_against_the_schema(schema: dict[str, Any]) -> None:
    """The example config fits the schema's shape."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    assert schema_errors(example, schema, schema) == []


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("routes", 0, "rollout", "weight"), 150),
        (("routes", 0, "rollout", "wieght"), 10),
        (("upstreams", "shop-v1", "connect_timeout"), "soon"),
        (("upstreams", "shop-v1", "host_header"), "origin"),
        (("listen", "port"), "8080"),
        (("routes",), []),
    ],
)
def test_schema_rejects_what_the_loader_rejects(
    schema: dict[str, Any], path: tuple[Any, ...], value: Any
) -> None:
    """Breaking the example in a way the loader refuses also breaks it for the schema."""
    example = yaml.safe_load(EXAMPLE.read_text(encoding="utf-8"))
    node = example
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = value
    assert schema_errors(example, schema, schema)
