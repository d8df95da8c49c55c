"""The job spec's reference cannot drift from its model: the shipped schema file is what `wurstfabrik schema` prints,
the field table in docs/jobs.md is what the model says, every field is described, and the schema and the spec
accept the examples and refuse the same mistakes."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from wurstfabrik.jobs.cli import main
from wurstfabrik.jobs.schema import DOCS_FILE, SCHEMA_FILE, TABLE_BEGIN, field_table, undescribed_fields, with_table
from wurstfabrik.jobs.spec import JobSpec, SpecError, load_spec

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
REGENERATE = "run `python -m wurstfabrik.jobs.schema` to rewrite it from jobs/spec.py"


@pytest.fixture(scope="module")
def shipped_schema():
    schema = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator.check_schema(schema)
    return schema


def schema_errors(schema: dict, spec: dict) -> list[str]:
    return [e.message for e in jsonschema.Draft202012Validator(schema).iter_errors(spec)]


def test_shipped_schema_is_what_the_cli_prints(capsys):
    assert main(["schema"]) == 0
    printed = capsys.readouterr().out
    shipped = SCHEMA_FILE.read_text(encoding="utf-8")
    assert printed == shipped, f"{SCHEMA_FILE.name} differs from the model; {REGENERATE}"
    schema = json.loads(printed)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["required"] == ["prompts"]


def test_every_field_has_a_description():
    assert undescribed_fields() == [], "give each field a docstring (its line below the field) in jobs/spec.py"


def test_every_field_in_the_schema_carries_its_description_and_default(shipped_schema):
    for group in (shipped_schema, *shipped_schema["$defs"].values()):
        assert group["additionalProperties"] is False
        for name, prop in group["properties"].items():
            assert prop.get("description") or "$ref" in prop, name
            assert "default" in prop or name in group.get("required", ()), name
    assert shipped_schema["properties"]["placement"]["default"]["prior_batch_size"] == 8


def test_field_table_in_docs_is_the_models():
    doc = DOCS_FILE.read_text(encoding="utf-8")
    assert doc.count(TABLE_BEGIN) == 1
    assert with_table(doc) == doc, f"the field table in docs/jobs.md differs from the model; {REGENERATE}"


def test_field_table_has_a_row_per_field_nested_ones_dotted():
    rows = [line.split(" | ")[0].removeprefix("| ") for line in field_table().splitlines()[2:]]
    assert rows[0] == "`prompts`"
    assert {"`placement.prior_gpus`", "`resilience.stall_s`", "`placement`"} <= set(rows)
    assert len(rows) == len(set(rows))
    assert "| `height` | integer > 0, ≤ 4096 | `1024` |" in field_table()


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_name_the_shipped_schema_and_validate_against_it(example, shipped_schema):
    first_line = example.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# yaml-language-server: $schema=")
    named = (example.parent / first_line.partition("$schema=")[2]).resolve()
    assert named == SCHEMA_FILE.resolve()
    spec = yaml.safe_load(example.read_text(encoding="utf-8"))
    assert schema_errors(shipped_schema, spec) == []
    load_spec(example)


@pytest.mark.parametrize("where", ["top", "placement", "resilience"])
@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_an_unknown_key_is_refused_by_the_schema_and_by_the_spec(example, where, shipped_schema, tmp_path):
    spec = yaml.safe_load(example.read_text(encoding="utf-8"))
    (spec if where == "top" else spec.setdefault(where, {}))["shard_sise"] = 64
    errors = schema_errors(shipped_schema, spec)
    assert len(errors) == 1 and "'shard_sise' was unexpected" in errors[0]
    typo = tmp_path / "typo.yaml"
    typo.write_text(yaml.safe_dump(spec), encoding="utf-8")
    with pytest.raises(SpecError, match=r"shard_sise: unknown field"):
        load_spec(typo)


@pytest.mark.parametrize("mistake", [
    {"height": 0}, {"width": 4097}, {"quality": 101}, {"format": "gif"}, {"seed": -1}, {"resize": "yes"},
    {"prior_timesteps": "fast"}, {"placement": {"prior_actors": 0}}, {"placement": {"prior_resources": {"a": "b"}}},
    {"resilience": {"stall_s": 0}}, {"prompts": None},
], ids=str)
def test_schema_and_spec_refuse_the_same_bad_values(mistake, shipped_schema):
    spec = {"prompts": "prompts.parquet", **mistake}
    assert schema_errors(shipped_schema, spec), f"the schema accepts {mistake}"
    with pytest.raises(SpecError):
        JobSpec.from_dict(spec)


def test_a_spec_without_prompts_is_refused_by_both(shipped_schema):
    assert schema_errors(shipped_schema, {"output": "out"}) == ["'prompts' is a required property"]
    with pytest.raises(SpecError, match="prompts: required field is missing"):
        JobSpec.from_dict({"output": "out"})
