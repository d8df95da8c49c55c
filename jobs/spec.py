"""The job spec: one YAML file plus `key=value` overrides, validated into a frozen JobSpec.

Every problem with a spec surfaces as a SpecError whose lines each name the field at fault.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
    field_validator,
    model_validator,
)

from wurstfabrik.store.prompts import MAX_SIDE

from .spec_sections import Frozen, Placement, Resilience

SEED_LIMIT = 2**63

# Fields that decide what the images look like; a resumed job must match them exactly.
GENERATION_FIELDS = (
    "prior",
    "prior_text",
    "decoder",
    "height",
    "width",
    "images_per_prompt",
    "seed",
    "prior_steps",
    "prior_timesteps",
    "prior_guidance_scale",
    "decoder_steps",
    "decoder_guidance_scale",
    "negative_prompt",
    "dtype",
    "prompt_column",
    "id_column",
    "negative_prompt_column",
    "seed_column",
    "height_column",
    "width_column",
    "format",
    "quality",
    "output_format",
    "prompt_syntax",
    "long_prompts",
    "resize",
    "quantize",
)

# Generation fields added after outputs were made: recorded, and hashed into the job id, only when not at their
# default, so the ids of outputs made before them stay the same and those outputs still resume.
LATER_GENERATION_DEFAULTS = {"quantize": "none"}
SAMPLER_FIELDS = (
    "prior_steps",
    "prior_timesteps",
    "prior_guidance_scale",
    "decoder_steps",
    "decoder_guidance_scale",
    "quantize",
)


class SpecError(Exception):
    """A job spec that cannot be read or does not validate."""


def _check_location(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if value.startswith("s3://"):
        bucket = value[len("s3://") :].split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{value!r} names no bucket; expected s3://bucket/prefix")
    return value


class JobSpec(Frozen):
    """Everything one generation job needs: inputs, models, sampler, output, placement."""

    prompts: str
    """The prompt files: a Parquet file, a folder, a glob, or an `s3://` prefix."""
    prompt_column: str = "prompt"
    """The column of prompt texts (strings; null, empty and over-2000-character prompts are bad rows)."""
    id_column: str | None = None
    """A column of stable prompt ids (strings or integers); without it, an id is `<file name>-<row number>`."""
    negative_prompt_column: str | None = None
    """A column of per-row negative prompts; without it, `negative_prompt` for every row."""
    seed_column: str | None = None
    """A column of per-row seeds; without it, seeds derive from `seed` and the prompt id."""
    height_column: str | None = None
    """A column of per-row heights; without it, `height`."""
    width_column: str | None = None
    """A column of per-row widths; without it, `width`."""

    output: str = "output"
    """Where the images, manifest and run records go: a folder (relative to where the job runs) or
    `s3://bucket/prefix`."""

    prior: str = "warp-ai/wuerstchen-prior"
    """The prior (Stage C): a hub id, a checkpoint folder, or an `s3://` prefix written by `wurstfabrik mirror`; a
    model-only prior works too (docs/engine.md)."""
    prior_text: str = "warp-ai/wuerstchen-prior"
    """Where a model-only prior takes its text encoder and tokenizer from (a hub id, folder or `s3://` prefix)."""
    decoder: str = "warp-ai/wuerstchen"
    """The decoder (Stage B and Stage A): a hub id, a checkpoint folder, or an `s3://` prefix written by
    `wurstfabrik mirror`."""
    checkpoint_cache: str | None = None
    """The folder on each node (an absolute path) where actors keep the `s3://` checkpoints they fetch: the first
    actor on a node fetches, the others read its copy. None: `~/.cache/wurstfabrik/checkpoints` (under
    `$XDG_CACHE_HOME` if set)."""

    height: StrictInt = Field(1024, gt=0, le=MAX_SIDE)
    """The image height delivered, exactly (made at the nearest size the stages can make that covers it, then cut)."""
    width: StrictInt = Field(1024, gt=0, le=MAX_SIDE)
    """The image width delivered, exactly (as `height`)."""
    images_per_prompt: StrictInt = Field(1, ge=1)
    """Images per prompt row."""
    seed: StrictInt = Field(0, ge=0, lt=SEED_LIMIT)
    """The job seed; image seeds derive from it and the prompt id, unless `seed_column` gives them."""

    prior_steps: StrictInt | None = Field(None, ge=1)
    """Stage C sampler steps, evenly spaced; none: Würstchen's 30-step schedule. Set this or `prior_timesteps`, not
    both."""
    prior_timesteps: tuple[StrictFloat, ...] | None = None
    """Stage C sampler timesteps, strictly decreasing within [0, 1]; none: Würstchen's 30-step schedule."""
    prior_guidance_scale: StrictFloat = Field(4.0, ge=0)
    """Stage C classifier-free guidance (1 or less turns it off)."""
    decoder_steps: StrictInt = Field(12, ge=1)
    """Stage B sampler steps."""
    decoder_guidance_scale: StrictFloat = Field(0.0, ge=0)
    """Stage B classifier-free guidance (1 or less turns it off)."""
    negative_prompt: str = ""
    """The negative prompt where there is no `negative_prompt_column`."""

    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    """The stages' dtype; none (auto): bfloat16 on CUDA, float32 elsewhere."""
    format: Literal["png", "jpeg", "webp"] = "png"
    """Image encoding (`jpg` is read as `jpeg`)."""
    quality: StrictInt = Field(90, ge=1, le=100)
    """JPEG and WebP quality."""
    prompt_syntax: Literal["plain", "compel", "a1111"] = "plain"
    """`compel` or `a1111` read prompt weighting (docs/engine.md); a prompt that does not parse is a bad row."""
    long_prompts: Literal["truncate", "chunk"] = "truncate"
    """`truncate` cuts prompts at CLIP's 77 tokens; `chunk` encodes longer prompts window by window instead."""
    resize: StrictBool = False
    """Scale the made image to the requested size before cutting (keeping the aspect ratio), instead of only cutting."""

    compile: StrictBool | None = None
    """Compile each stage's step (`torch.compile`, CUDA graphs); none (auto): on for CUDA, off elsewhere and with
    offload."""
    compile_cache: str | None = None
    """A folder or `s3://` prefix where compiled kernels are kept, so only the first actor of a stage compiles."""
    offload: Literal["none", "model", "sequential"] = "none"
    """`model` or `sequential`: keep modules in CPU memory while they do not run, for small GPUs; not with `compile`."""
    quantize: Literal["none", "fp8"] = "none"
    """`fp8`: Stage C's and Stage B's linear layers in float8 e4m3 with per-row scales (NVIDIA compute capability
    8.9 or newer, or the CPU); changes the images slightly, so it is a generation parameter."""

    output_format: Literal["files", "webdataset", "parquet"] = "files"
    """One image file each (`files`), WebDataset tar shards, or Hugging Face Parquet shards
    (docs/jobs.md#output-formats)."""
    shard_size: StrictInt = Field(256, ge=1, le=100_000)
    """Images per WebDataset or Parquet shard."""
    bad_rows: Literal["refuse", "skip"] = "refuse"
    """`refuse`: any bad row stops the job before it starts (up to 20 listed); `skip`: bad rows become `failed`
    manifest rows naming file, row and problem, and the rest runs."""

    placement: Placement = Field(default_factory=Placement)
    """How the stages are spread over the Ray cluster; does not change the images."""
    resilience: Resilience = Field(default_factory=Resilience)
    """How long a run waits out trouble before it gives up; does not change the images."""

    @field_validator("prompts")
    @classmethod
    def _prompts_location(cls, value: str) -> str:
        return _check_location(value)

    @field_validator(
        "prompt_column",
        "id_column",
        "negative_prompt_column",
        "seed_column",
        "height_column",
        "width_column",
        "prior",
        "prior_text",
        "decoder",
    )
    @classmethod
    def _not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("prior", "prior_text", "decoder")
    @classmethod
    def _checkpoint_location(cls, value: str) -> str:
        return _check_location(value) if value.startswith("s3://") else value

    @field_validator("checkpoint_cache")
    @classmethod
    def _node_folder(cls, value: str | None) -> str | None:
        # Resolved on each node, where a relative path would depend on the worker's working directory.
        if value is not None and not value.startswith(("/", "~")):
            raise ValueError(f"{value!r}: must be an absolute path (or start with ~), the same folder on each node")
        return value

    @field_validator("compile_cache")
    @classmethod
    def _cache_location(cls, value: str | None) -> str | None:
        return None if value is None else cls._output_location(value)

    @field_validator("output")
    @classmethod
    def _output_location(cls, value: str) -> str:
        value = _check_location(value)
        scheme, sep, _ = value.partition("://")
        if sep and scheme != "s3":
            raise ValueError(f"{value!r}: only local folders and s3:// URIs are supported")
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _format_alias(cls, value: Any) -> Any:
        # "jpg" is what people type; the writer and PIL call it "jpeg".
        return "jpeg" if value == "jpg" else value

    @field_validator("prior_timesteps")
    @classmethod
    def _timesteps_schedule(cls, timesteps: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if timesteps is None:
            return None
        # The sampler steps from each timestep to the next, so it needs at least one pair.
        if len(timesteps) < 2:
            raise ValueError("needs at least 2 values")
        for i, t in enumerate(timesteps):
            if not 0.0 <= t <= 1.0:
                raise ValueError(f"value [{i}] = {t} is outside [0, 1]")
        for i in range(1, len(timesteps)):
            if timesteps[i] >= timesteps[i - 1]:
                raise ValueError(
                    f"must be strictly decreasing; [{i}] = {timesteps[i]} follows {timesteps[i - 1]}"
                )
        return timesteps

    @model_validator(mode="after")
    def _one_prior_schedule(self) -> JobSpec:
        if self.prior_steps is not None and self.prior_timesteps is not None:
            raise ValueError("prior_steps, prior_timesteps: set one or the other, not both")
        return self

    @model_validator(mode="after")
    def _compile_without_offload(self) -> JobSpec:
        # A compiled step keeps its weights' device memory, which is what offload is there to free.
        if self.compile and self.offload != "none":
            raise ValueError("compile, offload: a compiled stage cannot be offloaded; set one or the other")
        return self

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Validates a plain mapping (as read from YAML), raising SpecError."""
        if not isinstance(data, dict):
            raise SpecError(f"job spec: expected a mapping, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise SpecError(_describe(err)) from None

    def with_overrides(self, overrides: list[str]) -> JobSpec:
        """A copy with `key=value` overrides applied and the result validated again."""
        return JobSpec.from_dict(apply_overrides(self.model_dump(), overrides))

    def generation_params(self) -> dict[str, Any]:
        """The fields that decide image content, as JSON-ready values (tuples become lists)."""
        params = self.model_dump(mode="json", include=set(GENERATION_FIELDS))
        return {k: v for k, v in params.items()
                if k not in LATER_GENERATION_DEFAULTS or v != LATER_GENERATION_DEFAULTS[k]}

    def sampler_params(self) -> dict[str, Any]:
        """The sampler settings alone, as recorded with each image in the manifest."""
        return self.model_dump(mode="json", include=set(SAMPLER_FIELDS))


def default_spec(prompts: str, output: str, **fields: Any) -> JobSpec:
    """A spec with defaults for everything but the given fields."""
    return JobSpec.from_dict({"prompts": prompts, "output": output, **fields})


def load_spec(path: str | Path, overrides: list[str] = ()) -> JobSpec:
    """Reads a YAML job spec, applies `key=value` overrides, and validates it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{path}: cannot read: {err}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SpecError(f"{path}: malformed YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        got = "an empty file" if data is None else f"a {type(data).__name__}"
        raise SpecError(f"{path}: the top level must be a mapping of fields, got {got}")
    return JobSpec.from_dict(apply_overrides(data, overrides))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of `data` with each `dotted.key=value` set; values are parsed as YAML."""
    data = _deep_copy(data)
    for override in overrides:
        key, sep, raw = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SpecError(f"override {override!r}: expected key=value")
        path = key.split(".")
        _check_override_key(key, path)
        value = _parse_override_value(key, raw)
        target = data
        for depth, part in enumerate(path[:-1]):
            child = target.get(part)
            if child is None:
                child = target[part] = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: depth + 1])
                raise SpecError(f"override {key}: {where} is not a mapping")
            target = child
        target[path[-1]] = value
    return data


def _check_override_key(key: str, path: list[str]) -> None:
    model: type[BaseModel] | None = JobSpec
    for depth, part in enumerate(path):
        if model is None:
            raise SpecError(f"override {key}: unknown field {'.'.join(path[: depth + 1])}")
        field = model.model_fields.get(part)
        if field is None:
            raise SpecError(f"override {key}: unknown field {'.'.join(path[: depth + 1])}")
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            model = annotation
        elif getattr(annotation, "__origin__", None) is dict and depth + 2 == len(path):
            return  # a key inside a mapping field, e.g. placement.prior_resources.accel=1
        else:
            model = None
    if model is not None:
        raise SpecError(f"override {key}: {key} is a group of fields; set one of them")


def _parse_override_value(key: str, raw: str) -> Any:
    # `negative_prompt=` means the empty string, not YAML's null.
    if raw.strip() == "":
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as err:
        raise SpecError(f"override {key}: value {raw!r} is not valid YAML: {_yaml_problem(err)}") from None


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _yaml_problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    mark = getattr(err, "problem_mark", None)
    if mark is None:
        return problem
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}"


_MESSAGES = {
    "greater_than": "must be > {gt}",
    "greater_than_equal": "must be >= {ge}",
    "less_than": "must be < {lt}",
    "less_than_equal": "must be <= {le}",
    "literal_error": "must be one of {expected}",
    "extra_forbidden": "unknown field",
    "missing": "required field is missing",
    "int_type": "must be an integer",
    "int_from_float": "must be an integer",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "string_type": "must be a string",
    "bool_type": "must be true or false",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "tuple_type": "must be a list",
}


def _describe(err: ValidationError) -> str:
    lines = []
    for problem in err.errors(include_url=False):
        loc = _field_path(problem["loc"])
        kind = problem["type"]
        if kind in _MESSAGES:
            ctx = {name: _plain_number(value) for name, value in problem.get("ctx", {}).items()}
            message = _MESSAGES[kind].format(**ctx)
        else:
            message = problem["msg"].removeprefix("Value error, ")
        if kind not in ("missing", "extra_forbidden", "value_error"):
            message += f" (got {_short_repr(problem['input'])})"
        lines.append(f"{loc}: {message}" if loc else message)
    return "\n".join(lines)


def _field_path(loc: tuple[str | int, ...]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _plain_number(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


def _short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
