"""Tests for jobs.spec: loading, overrides, and the field path in every error."""

import pytest

from wurstfabrik.jobs.spec import JobSpec, SpecError, default_spec, load_spec

MINIMAL = "prompts: data/prompts.parquet\noutput: out/\n"


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def spec_error(data):
    with pytest.raises(SpecError) as caught:
        JobSpec.from_dict({"prompts": "p.parquet", "output": "out", **data})
    return str(caught.value)


def test_minimal_spec_gets_documented_defaults(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL))
    assert spec.prompts == "data/prompts.parquet"
    assert spec.output == "out/"
    assert spec.prompt_column == "prompt"
    assert spec.id_column is None
    assert spec.prior == "warp-ai/wuerstchen-prior"
    assert spec.decoder == "warp-ai/wuerstchen"
    assert (spec.height, spec.width, spec.images_per_prompt, spec.seed) == (1024, 1024, 1, 0)
    assert spec.prior_steps is None and spec.prior_timesteps is None
    assert spec.prior_guidance_scale == 4.0
    assert spec.decoder_steps == 12
    assert spec.decoder_guidance_scale == 0.0
    assert spec.negative_prompt == ""
    assert spec.dtype is None
    assert (spec.format, spec.quality) == ("png", 90)
    placement = spec.placement
    assert (placement.prior_actors, placement.decoder_actors) == (1, 1)
    assert (placement.prior_gpus, placement.decoder_gpus) == (None, None)
    assert (placement.prior_batch_size, placement.decoder_batch_size) == (8, 8)
    assert placement.writer_concurrency is None
    assert placement.prior_resources == {} and placement.decoder_resources == {}
    assert (placement.max_restarts, placement.max_task_retries) == (3, -1)
    assert placement.fused is False


def test_full_spec_loads(tmp_path):
    text = MINIMAL + (
        "id_column: key\nseed_column: s\nheight: 512\nwidth: 768\nimages_per_prompt: 2\n"
        "prior_timesteps: [1.0, 0.6667, 0.3333, 0.0]\ndtype: bfloat16\nformat: webp\nquality: 80\n"
        "placement:\n  prior_gpus: 0.5\n  decoder_actors: 4\n  prior_resources: {accel: 1}\n"
    )
    spec = load_spec(write(tmp_path, text))
    assert (spec.height, spec.width, spec.images_per_prompt) == (512, 768, 2)
    assert spec.prior_timesteps == (1.0, 0.6667, 0.3333, 0.0)
    assert spec.placement.prior_gpus == 0.5
    assert spec.placement.decoder_actors == 4
    assert spec.placement.prior_resources == {"accel": 1.0}


def test_spec_is_frozen():
    spec = default_spec("p.parquet", "out")
    with pytest.raises(ValueError):
        spec.height = 5
    with pytest.raises(ValueError):
        spec.placement.prior_actors = 5


def test_unknown_top_level_key_is_named():
    assert "hieght: unknown field" in spec_error({"hieght": 512})


def test_unknown_placement_key_is_named():
    assert "placement.prior_gpu: unknown field" in spec_error({"placement": {"prior_gpu": 1}})


def test_missing_required_fields_are_named():
    with pytest.raises(SpecError) as caught:
        JobSpec.from_dict({})
    message = str(caught.value)
    assert "prompts: required field is missing" in message
    assert len(message.splitlines()) == 1


def test_output_defaults_to_a_local_folder():
    assert JobSpec.from_dict({"prompts": "p.parquet"}).output == "output"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"height": "big"}, "height: must be an integer"),
        ({"height": True}, "height: must be an integer"),
        ({"height": 512.5}, "height: must be an integer"),
        ({"prior_guidance_scale": "high"}, "prior_guidance_scale: must be a number"),
        ({"prompt_column": 3}, "prompt_column: must be a string"),
        ({"placement": 4}, "placement: must be a mapping"),
        ({"placement": {"prior_actors": "two"}}, "placement.prior_actors: must be an integer"),
        ({"prior_timesteps": [1.0, "x"]}, "prior_timesteps[1]: must be a number"),
        ({"placement": {"prior_resources": {"a": "x"}}}, "placement.prior_resources.a: must be a number"),
    ],
)
def test_wrong_types_name_the_field(data, expected):
    assert expected in spec_error(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"height": 0}, "height: must be > 0 (got 0)"),
        ({"width": 4097}, "width: must be <= 4096"),
        ({"images_per_prompt": 0}, "images_per_prompt: must be >= 1"),
        ({"seed": -1}, "seed: must be >= 0"),
        ({"seed": 2**63}, "seed: must be < 9223372036854775808"),
        ({"prior_guidance_scale": -0.5}, "prior_guidance_scale: must be >= 0"),
        ({"decoder_guidance_scale": -1}, "decoder_guidance_scale: must be >= 0"),
        ({"prior_guidance_scale": float("nan")}, "prior_guidance_scale: must be a finite number"),
        ({"prior_steps": 0}, "prior_steps: must be >= 1"),
        ({"decoder_steps": 0}, "decoder_steps: must be >= 1"),
        ({"quality": 101}, "quality: must be <= 100"),
        ({"quality": 0}, "quality: must be >= 1"),
        ({"dtype": "float8"}, "dtype: must be one of 'float32', 'float16' or 'bfloat16'"),
        ({"format": "gif"}, "format: must be one of"),
        ({"placement": {"prior_gpus": -1}}, "placement.prior_gpus: must be >= 0"),
        ({"placement": {"decoder_gpus": 1.5}}, "placement.decoder_gpus: fractions are only allowed below 1"),
        ({"placement": {"prior_actors": 0}}, "placement.prior_actors: must be >= 1"),
        ({"placement": {"decoder_batch_size": 0}}, "placement.decoder_batch_size: must be >= 1"),
        ({"placement": {"max_restarts": -2}}, "placement.max_restarts: must be >= -1"),
        ({"placement": {"prior_resources": {"GPU": 1}}}, "placement.prior_resources: 'GPU' is set by"),
        ({"placement": {"prior_resources": {"a": -1}}}, "placement.prior_resources: 'a' must be >= 0"),
        ({"placement": {"fused": True, "decoder_actors": 2, "decoder_gpus": 0.5}},
         "placement: fused actors take prior_actors, prior_cpus, prior_gpus and prior_resources; decoder_actors, "
         "decoder_gpus only apply to two pools"),
        ({"placement": {"fused": "yes"}}, "placement.fused: "),
        ({"output": "s3://"}, "output: 's3://' names no bucket"),
        ({"output": "s3:///prefix"}, "output: 's3:///prefix' names no bucket"),
        ({"output": "gs://bucket/x"}, "output: 'gs://bucket/x': only local folders and s3://"),
        ({"output": " "}, "output: must not be empty"),
        ({"prompts": "s3://"}, "prompts: 's3://' names no bucket"),
        ({"id_column": ""}, "id_column: must not be empty"),
    ],
)
def test_bad_ranges_name_the_field(data, expected):
    assert expected in spec_error(data)


@pytest.mark.parametrize(
    ("timesteps", "expected"),
    [
        ([1.0, 0.5, 0.5], "must be strictly decreasing; [2] = 0.5 follows 0.5"),
        ([0.5, 1.0], "must be strictly decreasing"),
        ([1.5, 0.5], "value [0] = 1.5 is outside [0, 1]"),
        ([1.0, -0.1], "value [1] = -0.1 is outside [0, 1]"),
        ([1.0], "needs at least 2 values"),
    ],
)
def test_bad_timesteps(timesteps, expected):
    message = spec_error({"prior_timesteps": timesteps})
    assert message.startswith("prior_timesteps: ")
    assert expected in message


def test_prior_steps_and_timesteps_are_exclusive():
    message = spec_error({"prior_steps": 30, "prior_timesteps": [1.0, 0.0]})
    assert "prior_steps, prior_timesteps" in message


def test_every_problem_gets_one_line_without_pydantic_boilerplate():
    message = spec_error({"height": 0, "bogus": 1, "placement": {"prior_gpus": -1}})
    lines = message.splitlines()
    assert len(lines) == 3
    assert "errors.pydantic.dev" not in message
    assert "validation error" not in message


def test_jpg_means_jpeg():
    assert default_spec("p", "o", format="jpg").format == "jpeg"


def test_s3_output_with_bucket_is_accepted():
    assert default_spec("s3://in/prompts/", "s3://bucket/run1").output == "s3://bucket/run1"


def test_s3_checkpoints_name_a_bucket_and_the_cache_is_one_folder_on_every_node():
    spec = default_spec("p.parquet", "out", prior="s3://weights/wuerstchen/prior/", checkpoint_cache="~/ckpt")
    assert (spec.prior, spec.checkpoint_cache) == ("s3://weights/wuerstchen/prior/", "~/ckpt")
    with pytest.raises(SpecError, match=r"^decoder: 's3:///x' names no bucket"):
        default_spec("p.parquet", "out", decoder="s3:///x")
    for relative in ("cache", "s3://b/cache"):
        with pytest.raises(SpecError, match=rf"^checkpoint_cache: '{relative}': must be an absolute path"):
            default_spec("p.parquet", "out", checkpoint_cache=relative)


def test_overrides_top_level_and_nested(tmp_path):
    spec = load_spec(
        write(tmp_path, MINIMAL),
        [
            "height=512",
            "placement.prior_actors=2",
            "placement.prior_gpus=0.25",
            "dtype=float16",
            "prior_timesteps=[1.0, 0.5, 0.0]",
            "negative_prompt=blurry, low quality",
            "placement.decoder_resources.accel=1",
        ],
    )
    assert spec.height == 512
    assert spec.placement.prior_actors == 2
    assert spec.placement.prior_gpus == 0.25
    assert spec.dtype == "float16"
    assert spec.prior_timesteps == (1.0, 0.5, 0.0)
    assert spec.negative_prompt == "blurry, low quality"
    assert spec.placement.decoder_resources == {"accel": 1.0}


def test_override_beats_file_and_keeps_siblings(tmp_path):
    path = write(tmp_path, MINIMAL + "placement:\n  decoder_actors: 3\n  prior_actors: 5\n")
    spec = load_spec(path, ["placement.prior_actors=2"])
    assert (spec.placement.prior_actors, spec.placement.decoder_actors) == (2, 3)


def test_override_with_empty_value_is_empty_string(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL + "negative_prompt: ugly\n"), ["negative_prompt="])
    assert spec.negative_prompt == ""


def test_override_null_clears_optional_field(tmp_path):
    spec = load_spec(write(tmp_path, MINIMAL + "id_column: key\n"), ["id_column=null"])
    assert spec.id_column is None


def test_override_can_supply_required_field(tmp_path):
    spec = load_spec(write(tmp_path, "prompts: p.parquet\n"), ["output=s3://bucket/x"])
    assert spec.output == "s3://bucket/x"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("heigth=512", "override heigth: unknown field heigth"),
        ("placement.prior_gpu=1", "override placement.prior_gpu: unknown field placement.prior_gpu"),
        ("height.x=1", "override height.x: unknown field height.x"),
        ("placement=1", "placement is a group of fields"),
        ("height", "override 'height': expected key=value"),
        ("=5", "expected key=value"),
        ("height=[1", "override height: value '[1' is not valid YAML"),
    ],
)
def test_bad_override_is_named(tmp_path, override, expected):
    with pytest.raises(SpecError) as caught:
        load_spec(write(tmp_path, MINIMAL), [override])
    assert expected in str(caught.value)


def test_override_value_is_validated(tmp_path):
    with pytest.raises(SpecError, match=r"placement\.prior_gpus: must be >= 0 \(got -1\)"):
        load_spec(write(tmp_path, MINIMAL), ["placement.prior_gpus=-1"])


def test_override_through_non_mapping_is_named(tmp_path):
    with pytest.raises(SpecError, match="override placement.prior_actors: placement is not a mapping"):
        load_spec(write(tmp_path, MINIMAL + "placement: 3\n"), ["placement.prior_actors=2"])


def test_with_overrides_returns_new_spec():
    spec = default_spec("p", "o")
    changed = spec.with_overrides(["seed=7"])
    assert (spec.seed, changed.seed) == (0, 7)


def test_missing_file_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="nope.yaml: no such file"):
        load_spec(missing)


def test_malformed_yaml_is_named_with_line(tmp_path):
    path = write(tmp_path, MINIMAL + "height: [512\nwidth: 3\n")
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: malformed YAML")
    assert "line" in message


@pytest.mark.parametrize(("text", "got"), [("", "an empty file"), ("- a\n- b\n", "a list"), ("3\n", "a int")])
def test_top_level_must_be_mapping(tmp_path, text, got):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=f"top level must be a mapping of fields, got {got}"):
        load_spec(path)


def test_generation_params_cover_content_not_placement_or_paths():
    spec = default_spec("p", "o", prior_timesteps=[1.0, 0.5, 0.0], seed_column="s")
    params = spec.generation_params()
    assert "placement" not in params
    assert "prompts" not in params and "output" not in params
    for name in ("prior", "decoder", "height", "width", "images_per_prompt", "seed", "prior_steps",
                 "prior_guidance_scale", "decoder_steps", "decoder_guidance_scale", "negative_prompt",
                 "dtype", "prompt_column", "seed_column", "format", "quality"):
        assert name in params
    # JSON-ready, so it compares equal to what job.json gives back.
    assert params["prior_timesteps"] == [1.0, 0.5, 0.0]


def test_generation_params_ignore_placement_and_paths():
    a = default_spec("p", "o")
    b = default_spec("q", "s3://b/x", placement={"prior_actors": 4, "decoder_gpus": 0.5})
    assert a.generation_params() == b.generation_params()
    assert a.generation_params() != default_spec("p", "o", seed=1).generation_params()


def test_sampler_params():
    assert default_spec("p", "o", prior_steps=30).sampler_params() == {
        "prior_steps": 30,
        "prior_timesteps": None,
        "prior_guidance_scale": 4.0,
        "decoder_steps": 12,
        "decoder_guidance_scale": 0.0,
        "quantize": "none",
    }


def test_a_fused_spec_survives_its_own_dump():
    """Run records and `ray job submit` carry the spec as its dump: the decoder fields' defaults must not count as
    set against fused."""
    spec = JobSpec.from_dict({"prompts": "p.parquet", "output": "out",
                              "placement": {"fused": True, "prior_actors": 2, "decoder_batch_size": 4}})
    assert JobSpec.from_dict(spec.model_dump(mode="json")) == spec
