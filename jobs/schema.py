"""The job spec's reference, generated from JobSpec so that it cannot drift from it: the JSON Schema that
`wurstfabrik schema` prints (shipped as schema/job.schema.json, for editors) and the field table in docs/jobs.md.

`python -m wurstfabrik.jobs.schema` rewrites both files from the model; tests/test_schema.py fails while either differs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from .spec import JobSpec

REPO = Path(__file__).resolve().parents[1]
SCHEMA_FILE = REPO / "schema" / "job.schema.json"
DOCS_FILE = REPO / "docs" / "jobs.md"
TABLE_BEGIN = ("<!-- spec-table: written by `python -m wurstfabrik.jobs.schema` from jobs/spec.py and "
               "jobs/spec_sections.py; edit the docstrings there -->")
TABLE_END = "<!-- end of spec-table -->"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def job_schema() -> dict[str, Any]:
    """JobSpec's JSON Schema, as pydantic writes it, with the defaults of nested groups filled in."""
    schema = JobSpec.model_json_schema()
    _fill_factory_defaults(JobSpec, schema, schema["$defs"])
    _one_line_descriptions(schema)
    return {"$schema": DIALECT, **schema}


def schema_text() -> str:
    return json.dumps(job_schema(), indent=2, ensure_ascii=False) + "\n"


def undescribed_fields(model: type[BaseModel] = JobSpec, prefix: str = "") -> list[str]:
    """The dotted names of fields without a description (a docstring under the field)."""
    missing = []
    for name, field in model.model_fields.items():
        if not (field.description or "").strip():
            missing.append(prefix + name)
        if _is_model(field.annotation):
            missing += undescribed_fields(field.annotation, f"{prefix}{name}.")
    return missing


def field_table() -> str:
    """The job spec's fields as a Markdown table: one row per field, nested groups' fields as `group.field`."""
    schema = job_schema()
    rows = ["| field | type | default | meaning |", "|---|---|---|---|"]
    for name, prop, required in _fields(schema, schema):
        # A group's field has its model's description when the two are the same (pydantic then writes only one).
        description = prop.get("description") or (_ref(prop, schema) or {}).get("description", "")
        rows.append(f"| `{name}` | {_kind(prop, schema)} | {_default(prop, required)} | "
                    f"{description.replace('|', '&#124;')} |")
    return "\n".join(rows) + "\n"


def with_table(doc: str) -> str:
    """`doc` with the text between the table markers replaced by the current field table."""
    head, begin, rest = doc.partition(TABLE_BEGIN)
    _, end, tail = rest.partition(TABLE_END)
    if not begin or not end:
        raise ValueError(f"the field table's markers are missing: {TABLE_BEGIN!r} ... {TABLE_END!r}")
    return f"{head}{TABLE_BEGIN}\n{field_table()}{TABLE_END}{tail}"


def _fields(node: dict[str, Any], schema: dict[str, Any], prefix: str = ""):
    required = set(node.get("required", ()))
    for name, prop in node["properties"].items():
        yield prefix + name, prop, name in required
        group = _ref(prop, schema)
        if group is not None:
            yield from _fields(group, schema, f"{prefix}{name}.")


def _ref(prop: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any] | None:
    ref = prop.get("$ref")
    return schema["$defs"][ref.removeprefix("#/$defs/")] if ref else None


def _kind(prop: dict[str, Any], schema: dict[str, Any]) -> str:
    if _ref(prop, schema) is not None:
        return "mapping of the fields below"
    if "anyOf" in prop:
        return " or ".join(_kind(p, schema) for p in prop["anyOf"] if p.get("type") != "null")
    if "enum" in prop:
        return ", ".join(f"`{value}`" for value in prop["enum"])
    kind = prop.get("type")
    if kind in ("integer", "number"):
        bounds = [f"{sign} {_number(prop[key])}" for key, sign in
                  (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))
                  if key in prop]
        return " ".join([kind, ", ".join(bounds)]).strip()
    if kind == "boolean":
        return "`true` or `false`"
    if kind == "array":
        return f"list of {_kind(prop['items'], schema)}s"
    if kind == "object":
        return f"mapping of names to {_kind(prop['additionalProperties'], schema)}s"
    return kind or "any"


def _default(prop: dict[str, Any], required: bool) -> str:
    if required:
        return "required"
    if "default" not in prop:
        return ""
    value = prop["default"]
    if value is None:
        return "none"
    if isinstance(value, dict) and value:
        return "below"
    if isinstance(value, str) and value:
        return f"`{value}`"
    return f"`{json.dumps(value)}`"


def _number(value: float) -> str:
    # Powers of two this large (the seed's bound) read better as powers.
    if isinstance(value, int) and value >= 2**32 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    return json.dumps(value)


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _fill_factory_defaults(model: type[BaseModel], node: dict[str, Any], defs: dict[str, Any]) -> None:
    # pydantic leaves out defaults made by a factory (a nested group, an empty mapping); an editor shows them.
    for name, field in model.model_fields.items():
        prop = node["properties"][name]
        if field.default_factory is not None and "default" not in prop:
            made = field.default_factory()
            prop["default"] = made.model_dump(mode="json") if isinstance(made, BaseModel) else made
        if _is_model(field.annotation):
            _fill_factory_defaults(field.annotation, defs[field.annotation.__name__], defs)


def _one_line_descriptions(node: Any) -> None:
    # A docstring wrapped in the source is one sentence, not several lines.
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "description" and isinstance(value, str):
                node[key] = " ".join(value.split())
            else:
                _one_line_descriptions(value)
    elif isinstance(node, list):
        for value in node:
            _one_line_descriptions(value)


def main() -> int:
    """Rewrites schema/job.schema.json and the field table in docs/jobs.md from JobSpec."""
    if not DOCS_FILE.exists():
        print(f"error: {DOCS_FILE} not found; run this from a checkout of the repository", file=sys.stderr)
        return 1
    missing = undescribed_fields()
    if missing:
        print(f"error: fields without a description (a docstring under the field): {', '.join(missing)}",
              file=sys.stderr)
        return 1
    SCHEMA_FILE.parent.mkdir(exist_ok=True)
    SCHEMA_FILE.write_text(schema_text(), encoding="utf-8")
    DOCS_FILE.write_text(with_table(DOCS_FILE.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {SCHEMA_FILE.relative_to(REPO)} and the field table in {DOCS_FILE.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
