"""The tune spec: pydantic models shared by the YAML file, the Python API and the CLI.

Every way a spec can be wrong ends as one `ConfigError` sentence that names the field and what would be
accepted (an unknown key gets a "did you mean"), so the CLI can print it and exit 2 without a traceback.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any, Literal, Mapping, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


#: Optuna samplers by the name a spec, the CLI and study.make_sampler use; defined here once.
SamplerName = Literal["nsga2", "tpe", "gp", "random"]
SAMPLERS: tuple[str, ...] = get_args(SamplerName)


class ConfigError(ValueError):
    """A tune spec that cannot be used; the message is one sentence."""


class Strict(BaseModel):
    """Base of every spec section: an unknown key is an error, since a typo silently ignored would run something other
    than what was asked, and a parsed spec is frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(Strict):
    """The teacher: where it comes from, its task family and label count; remote code and pickled weights are opt-in
    because either can run code on load."""

    path: str = Field(description="a local model directory, a .gguf file (causal LMs), or builtin:<name>")
    task: Literal["text-classification", "causal-lm"] = "text-classification"
    num_labels: int = Field(2, ge=2)
    trust_remote_code: bool = False
    allow_pickle: bool = False


class SplitSpec(Strict):
    """How the data is cut into train/validation/test: seeded, so a resumed or shared study scores every trial on the
    same rows, and leaving at least 10% for training."""

    validation: float = Field(0.1, gt=0, lt=1)
    test: float = Field(0.1, gt=0, lt=1)
    seed: int = 0

    @model_validator(mode="after")
    def _leaves_training_data(self) -> "SplitSpec":
        if self.validation + self.test >= 0.9:
            raise ValueError(f"validation + test must leave at least 10% for training, got {self.validation} + {self.test}")
        return self


class DataSpec(Strict):
    """The labelled data file and how to read it; `max_length` is the truncation training and scoring share, `limit` a
    stratified subset for quick runs."""

    path: str
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = Field(128, ge=8, le=4096)
    split: SplitSpec = SplitSpec()
    limit: int | None = Field(None, ge=20, description="use a stratified subset of this many rows (quick runs)")


#: A causal LM's targets: per-token decode, time to first token, peak memory (beside `speedup`, on decode).
LM_TARGETS = ("decode_ms", "ttft_ms", "peak_mb")


class TargetSpec(Strict):
    """The latency constraint and exactly how it is measured: a latency means nothing without its percentile, batch,
    sequence length, threads, runtime and device, so they travel with it into result.json.

    An encoder classifier takes exactly one of an absolute `latency_ms` or a `speedup` over the baseline measured
    on this machine. A causal LM takes `decode_ms` (per token, at a context of `context_len`) or `speedup` (of
    decode), `ttft_ms` (the prefill of a `prompt_len`-token prompt), either or both, and optionally a memory budget
    `peak_mb`; every one of them is a constraint, and decode (else TTFT) is the latency the search minimises."""

    latency_ms: float | None = Field(None, gt=0)
    speedup: float | None = Field(None, gt=1, description="baseline latency / speedup, resolved on this machine")
    decode_ms: float | None = Field(None, gt=0, description="causal LMs: per-token decode latency")
    ttft_ms: float | None = Field(None, gt=0, description="causal LMs: time to first token of a prompt_len prompt")
    peak_mb: float | None = Field(None, gt=0, description="causal LMs: peak resident memory while generating")
    percentile: float = Field(95, gt=0, le=100)
    batch_size: int = Field(1, ge=1)
    seq_len: int = Field(64, ge=1)
    prompt_len: int = Field(128, ge=2, description="causal LMs: the prompt TTFT is timed on")
    context_len: int = Field(256, ge=2, description="causal LMs: the context decode is timed at")
    threads: Union[int, str] = "auto"
    runtime: str = "onnxruntime"
    device: Literal["cpu", "cuda"] = "cpu"
    margin: float | None = Field(None, ge=0, lt=0.5, description=(
        "headroom a recommendation must keep under the target, as a fraction (0.05: its latency's upper confidence "
        "bound <= 95% of the target); null: this machine's measured noise (the spread of the baseline's measurements; for "
        "a speedup, judged at the host's pace, the spread of their percentile over their median)"))

    @field_validator("threads", mode="before")
    @classmethod
    def _positive_threads(cls, value: Any) -> int | str:
        if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            return value
        raise ValueError(f"threads must be a positive integer or 'auto' (all physical cores), got {value!r}")

    @field_validator("runtime")
    @classmethod
    def _deployable_runtime(cls, value: str) -> str:
        """tune deploys ONNX artifacts; the torch runtime (autotune.runtime.TorchRuntime) measures and evaluates
        models but has no search pipeline yet, so it is refused here rather than silently ignored."""
        if value != "onnxruntime":
            raise ValueError(f"runtime must be 'onnxruntime' (the runtime tune deploys to), got {value!r}")
        return value

    @field_validator("percentile")
    @classmethod
    def _reported_percentile(cls, value: float) -> float:
        if value not in (50, 90, 95, 99):
            raise ValueError(f"percentile must be one of 50, 90, 95, 99 (the percentiles the harness reports), got {value}")
        return value

    def check_for(self, task: str) -> None:
        """ValueError unless the targets given are those of `task` (an encoder's latency, a causal LM's decode, TTFT
        and memory): a target of the other family would silently constrain nothing."""
        given = [name for name in LM_TARGETS if getattr(self, name) is not None]
        if task != "causal-lm":
            if given:
                raise ValueError(f"{given[0]} is a causal-lm target (model.task: causal-lm); a {task} model takes "
                                 "latency_ms or speedup")
            if (self.latency_ms is None) == (self.speedup is None):
                raise ValueError("give exactly one of latency_ms (absolute) or speedup (relative to the baseline)")
            return
        if self.latency_ms is not None:
            raise ValueError("latency_ms is an encoder's target; a causal LM takes decode_ms (per token), ttft_ms "
                             "(first token) or speedup (of decode)")
        if self.decode_ms is not None and self.speedup is not None:
            raise ValueError("give at most one of decode_ms (absolute) or speedup (relative to the baseline's decode)")
        if self.decode_ms is None and self.speedup is None and self.ttft_ms is None:
            raise ValueError("a causal LM needs decode_ms, speedup (of decode) or ttft_ms")
        if self.prompt_len > self.context_len:
            raise ValueError(f"prompt_len ({self.prompt_len}) is longer than context_len ({self.context_len}): the "
                             "prompt must fit in the context decode is timed at")


class SpaceSpec(Strict):
    """The search space: a preset derived from the teacher's shape plus per-knob overrides, so a spec names only what
    differs from the preset."""

    preset: str = "bert-default"
    knobs: dict[str, Any] = Field(default_factory=dict)


class SearchSpec(Strict):
    """How the study runs: sampler, trial budget, storage (which workers share), seed, objectives, and when the latency
    predictor may skip a gate."""

    sampler: SamplerName = "nsga2"
    trials: int = Field(20, ge=1)
    timeout_min: float | None = Field(
        None, gt=0, description="no new trial starts this many minutes after the command began (the teacher's fine-tune "
                                "and the baseline count; the trial running then, refining and the selection follow)")
    storage: str | None = None
    seed: int = 0
    minimize_size: bool = False
    skip_predicted_over: float | None = Field(
        1.5, gt=1, description="skip the latency gate of a candidate whose predicted latency interval lies wholly above "
                               "this multiple of the target (CPU targets; null: measure every candidate)")
    heartbeat_s: int = Field(10, ge=1, description="a worker's liveness signal; silent for 3x this, its trial is retried")


class TrainingSpec(Strict):
    """How students are distilled. Defaults are sized for a few CPU cores: short, length-bucketed epochs."""

    epochs: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(32, ge=1)
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)
    # Weight of the last-layer state transfer (the student's last hidden states, projected, onto the teacher's,
    # cached once per teacher and data); 0 trains on logits and labels only.
    state_weight: float = Field(0.0, ge=0)
    teacher_epochs: int = Field(2, ge=1)
    teacher_lr: float = Field(5e-5, gt=0)
    # Multi-fidelity: after the search, the `finalists` most accurate feasible students (distinct architectures
    # and sparsities) are distilled `refine_epochs` more epochs and evaluated again; 0 turns this off.
    finalists: int = Field(2, ge=1)
    refine_epochs: int = Field(1, ge=0)


class TuneSpec(Strict):
    """One tuning run as the YAML file, the Python API and the CLI all express it: one validated model, so the three
    accept and refuse the same specs."""

    name: str = Field(min_length=1)
    model: ModelSpec
    data: DataSpec
    target: TargetSpec
    space: SpaceSpec = SpaceSpec()
    search: SearchSpec = SearchSpec()
    training: TrainingSpec = TrainingSpec()

    @field_validator("name")
    @classmethod
    def _safe_name(cls, value: str) -> str:
        if "/" in value or "\\" in value or value.startswith("."):
            raise ValueError(f"name becomes a directory under runs/, so it may not contain '/' or start with '.', got {value!r}")
        return value

    @field_validator("space", mode="before")
    @classmethod
    def _preset_shorthand(cls, value: Any) -> Any:
        """`space: bert-default` is shorthand for `space: {preset: bert-default}`."""
        return {"preset": value} if isinstance(value, str) else value

    @model_validator(mode="before")
    @classmethod
    def _family_preset(cls, data: Any) -> Any:
        """A causal LM searches `llama-default` unless the spec names a preset."""
        if not isinstance(data, Mapping) or not isinstance(data.get("model"), Mapping):
            return data
        if data["model"].get("task") != "causal-lm" or data.get("space") is not None and not (
                isinstance(data["space"], Mapping) and "preset" not in data["space"]):
            return data
        space = data.get("space") or {}
        return {**data, "space": {**space, "preset": "llama-default"}}

    @model_validator(mode="after")
    def _targets_of_the_task(self) -> "TuneSpec":
        try:
            self.target.check_for(self.model.task)
        except ValueError as exc:
            raise ValueError(f"target: {exc}") from None
        if self.training.state_weight > 0 and self.model.task != "text-classification":
            raise ValueError("training.state_weight (the encoder students' state transfer) applies to "
                             f"text-classification; a {self.model.task} student is healed on the teacher's top-k logits")
        return self


TuneConfig = TuneSpec


def _model_for(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that owns the field at `loc`, to suggest the names it accepts."""
    model: type[BaseModel] | None = TuneSpec
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return model


def _sentence(error: Mapping[str, Any]) -> str:
    loc = tuple(error["loc"])
    where = ".".join(str(p) for p in loc) or "spec"
    if error["type"] == "extra_forbidden":
        owner = _model_for(loc)
        options = sorted(owner.model_fields) if owner else []
        close = difflib.get_close_matches(str(loc[-1]), options, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown key {where!r}{hint} Accepted keys here: {', '.join(options)}."
    if error["type"] == "missing":
        return f"{where} is required."
    message = str(error["msg"]).removeprefix("Value error, ")
    given = error.get("input")
    if error["type"] != "value_error" and not isinstance(given, (dict, list)):
        message = f"{message[0].lower() + message[1:]}, got {given!r}"
    return (f"{where}: " if loc else "") + message + ("" if message.endswith(".") else ".")


def parse_spec(data: Any, source: str = "spec") -> TuneSpec:
    """Validate a mapping; the first problem becomes one ConfigError sentence prefixed by `source`."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the spec must be a mapping of keys to values, got {type(data).__name__}.")
    try:
        return TuneSpec.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_sentence(exc.errors()[0])}") from None


def read_spec(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML spec with safe_load; a missing file or a syntax error is one sentence with the line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"spec file {path} does not exist.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"spec file {path} is not UTF-8 text.") from None
    except OSError as exc:
        raise ConfigError(f"spec file {path} cannot be read ({exc.strerror}).") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"spec file {path} has a YAML syntax error{line}: {problem}.") from None
    if data is None:
        raise ConfigError(f"spec file {path} is empty.")
    return data


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Overrides win; nested mappings merge key by key (so `search.trials` keeps the rest of `search`)."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_spec(spec: "TuneSpec | str | os.PathLike[str] | Mapping[str, Any]", overrides: Mapping[str, Any] | None = None) -> TuneSpec:
    """A validated spec from a TuneSpec, a YAML path or a mapping, with nested overrides applied."""
    if isinstance(spec, TuneSpec):
        data, source = spec.model_dump(), "spec"
    elif isinstance(spec, Mapping):
        data, source = dict(spec), "spec"
    else:
        data, source = read_spec(spec), f"spec file {spec}"
    if not isinstance(data, Mapping):
        return parse_spec(data, source)  # refuses it with the one-sentence message
    return parse_spec(deep_merge(data, overrides or {}), source)
