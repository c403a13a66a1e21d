"""Text classification, the first task family: a BERT-family encoder classifier, labelled text, accuracy.

Its students are the teacher with fewer layers and narrower widths (hidden, heads, FFN), distilled on the
teacher's logits (cached once per teacher and training split) plus the labels. Its artifact is one ONNX
classifier with ORT's transformer fusions, timed on one forward pass of synthetic token ids.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np
import onnx
import onnx.numpy_helper
import torch
from torch import nn

from autotune.builtin import resolve_data, resolve_model
from autotune.compress import (
    OPTIMIZER, PruningSchedule, distill, finetune_teacher, make_student, measured_sparsity, shaped_like, teacher_logits,
    teacher_states, tokenize,
)
from autotune.compress.distillation import TokenizedData
from autotune.compress.quantization import openvino_fp32_artifact, openvino_int8_artifact, quantize_artifact
from autotune.config import TuneSpec
from autotune.models import load_classifier, shape_of, state_fingerprint
from autotune.runtime import Artifact, artifact_runtime, export_artifact
from autotune.caches import STAGING, owned_temporary_directory
from autotune.tasks.base import Score, Steps, TaskFamily, Timed, Timing
from autotune.tasks.data import LabeledTexts, Splits, load_labeled_texts, split, subsample
from autotune.tasks.encoding import encode_batches, evaluate, predict_logits
from profilers.isolated import OnnxRequest, measure_onnx_interleaved, measure_onnx_isolated
from profilers.latency import MeasureSettings
from profilers.openvino import Shape, openvino_installed, optional_module
from profilers.ort import providers_for
from profilers.recipes import Recipe
from search_spaces import Candidate, Space, TeacherShape, preset, with_overrides

if TYPE_CHECKING:
    from autotune.progress import SilentProgress

#: A user metric: (labels, logits) -> a float, higher is better; it replaces accuracy as the objective.
Metric = Callable[[np.ndarray, np.ndarray], float]
#: The gate's stand-in keeps at most this many token embeddings: the table is only gathered from, so its
#: size does not change latency, but it is most of the bytes export, fusion and quantization copy. A prime, so
#: that no other weight of the stand-in has it as a dimension (see `full_table_size_bytes`).
GATE_VOCAB = 1021
#: Rows of the training split static int8 calibrates its activation ranges on, and their batch: 64 rows took NNCF
#: 11 s on the demo's teacher and kept its validation accuracy.
CALIBRATION_ROWS, CALIBRATION_BATCH = 64, 8


def openvino_input_shape(batch_size: int, seq_len: int, max_length: int) -> Shape | None:
    """The input shape OpenVINO artifacts are fixed to (compiled faster, see `profilers.openvino.fix_shape`): the
    timed batch and sequence length, which every input the task evaluates (cut to `max_length` tokens) fits in once
    padded; any shape when inputs can be longer than the timed sequence."""
    return (batch_size, seq_len) if max_length <= seq_len else None


@dataclass(frozen=True)
class LoadedClassifierRun:
    """What `TextClassification.load` read: the teacher as loaded, the data split, and the space."""

    teacher: nn.Module
    tokenizer: Any
    new_head: bool
    splits: Splits
    space: Space


def table_bytes(artifact: Artifact, rows: int) -> int:
    """The bytes of every weight with `rows` as its first dimension in the artifact's model file: the token table, and
    its quantized twin and per-row scales after int8, in whatever precision the variant stores them."""
    if artifact.engine == "openvino":
        model = optional_module("openvino").Core().read_model(str(artifact.model_path))
        shapes = [(list(op.get_output_shape(0)), op.get_output_element_type(0).size) for op in model.get_ordered_ops()
                  if op.get_type_name() == "Constant"]
        return sum(int(np.prod(shape)) * size for shape, size in shapes if shape and shape[0] == rows)
    model = onnx.load(str(artifact.model_path), load_external_data=False)
    return sum(onnx.numpy_helper.to_array(init).nbytes for init in model.graph.initializer
               if init.dims and init.dims[0] == rows)


def full_table_size_bytes(artifact: Artifact, full_rows: int) -> int:
    """The size on disk the artifact would have with `full_rows` token embeddings instead of its `vocab_size`; the
    rows' bytes are read off its model file (`table_bytes`)."""
    rows = artifact.vocab_size
    if full_rows == rows:
        return artifact.size_bytes
    row_bytes = table_bytes(artifact, rows)
    if row_bytes == 0:
        raise ValueError(f"{artifact.model_path} has no weight with {rows} rows; cannot scale its token table")
    return artifact.size_bytes + row_bytes * (full_rows - rows) // rows


def load_splits(spec: TuneSpec) -> Splits:
    """The spec's labelled data (builtin names resolved), optionally subsampled, split train/validation/test."""
    data_spec = spec.data
    data = load_labeled_texts(resolve_data(data_spec.path), text_column=data_spec.text_column,
                              label_column=data_spec.label_column, num_labels=spec.model.num_labels)
    if data_spec.limit is not None:
        data = subsample(data, data_spec.limit, seed=data_spec.split.seed)
    return split(data, validation=data_spec.split.validation, test=data_spec.split.test, seed=data_spec.split.seed)


def load_teacher(spec: TuneSpec) -> tuple[nn.Module, Any, bool]:
    """(model, tokenizer, new_head) for the spec's model, builtin names resolved.

    A new classification head is initialised from the search seed, not from whatever state torch's global
    generator is in: the same spec and seed then start from the same weights, so runs are reproducible and
    the fine-tuned teacher's cache (keyed by the starting weights) hits on the next run instead of never.
    """
    model_spec = spec.model
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.search.seed)
        loaded = load_classifier(resolve_model(model_spec.path), model_spec.num_labels,
                                 trust_remote_code=model_spec.trust_remote_code, allow_pickle=model_spec.allow_pickle)
    return loaded.model, loaded.tokenizer, loaded.new_head


def slim_cuts(teacher: TeacherShape, layers: int) -> list[Candidate]:
    """The teacher cut to `layers`, int8, with half and with a third of its heads (the best, kept whole) and a quarter
    of its FFN neurons: the depth that keeps accuracy at the cost of a shallower cut (the FFN is two thirds of a
    layer's GEMMs at BERT's shapes). A teacher whose heads or FFN do not divide so has fewer or none."""
    if teacher.ffn % 4:
        return []
    return [Candidate(layers=layers, hidden=teacher.hidden, heads=teacher.heads // share, ffn=teacher.ffn // 4, bits=8,
                      head_dim=teacher.hidden // teacher.heads) for share in (2, 3) if teacher.heads % share == 0]


def encoder_anchors(teacher: TeacherShape, space: Space) -> list[Candidate]:
    """The teacher and its int8 twin, then the teacher cut to the space's deepest shallower depth, at full width and
    slim (`slim_cuts`, where the space prunes heads: `head_dim`); then each shallower depth's slimmest cut, deepest
    first; then its other slim cuts; last the full-width cuts of the shallower depths; all int8.

    Dropping layers while keeping every width is the strongest simple student that a sampler drawing the knobs at
    random rarely proposes, and the slim cuts keep the depth that accuracy needs at the speed of a shallower cut. At
    one speed a deeper slim cut keeps more than a shallower full-width one (bench/students.py on the demo: 4 slim
    layers kept 99.3% of the teacher's test accuracy at 4.5x, the 2-layer full-width cut 97.2% at 4.4x), and below
    the deepest depth a third of the heads kept as much as half, faster (2 layers: 96.8% at 9.7x against 95.7% at
    8.7x; 3 layers in the demo: validation 0.834 at 2.7 ms against 0.831 at 2.8 ms), so the slimmest cuts come
    first and span the front from the target to its fast end. A slice too slow for the target costs one gate
    (seconds); a fitting one is the baseline the search has to beat.
    """
    depths = sorted((d for d in space.knob("layers").values() if d < teacher.layers), reverse=True)
    full_width = [teacher.cut_to(d, bits=8) for d in depths]
    slim = [slim_cuts(teacher, d) if space.has("head_dim") else [] for d in depths]
    slimmest = [cuts[-1] for cuts in slim[1:] if cuts]
    others = [c for cuts in slim[1:] for c in cuts[:-1]]
    return [teacher.as_candidate(32), teacher.as_candidate(8), *full_width[:1], *(slim[0] if slim else []),
            *slimmest, *others, *full_width[1:]]


@dataclass(frozen=True, eq=False)
class TextClassification(TaskFamily):
    """An encoder classifier ready for trials: the teacher, its cached logits on the tokenized training split."""

    name: ClassVar[str] = "text-classification"
    metric_name: ClassVar[str] = "accuracy"

    model: nn.Module
    tokenizer: Any
    train: TokenizedData
    logits: np.ndarray
    splits: Splits
    search_space: Space
    spec: TuneSpec
    fine_tuned: bool
    teacher_key: str  # a hash of the ready teacher's weights, computed once: it keys the logits and every student
    metric: Metric | None = None
    #: The teacher's last-layer states on the training split (packed, cached), when `training.state_weight` > 0.
    last_states: np.ndarray | None = None

    @classmethod
    def load(cls, spec: TuneSpec) -> LoadedClassifierRun:
        """Read and split the data, load the teacher (a new head seeded) and derive the space from its shape."""
        splits = load_splits(spec)
        teacher, tokenizer, new_head = load_teacher(spec)
        space = with_overrides(preset(spec.space.preset, shape_of(teacher)), spec.space.knobs)
        return LoadedClassifierRun(teacher, tokenizer, new_head, splits, space)

    @classmethod
    def prepare(cls, loaded: LoadedClassifierRun, spec: TuneSpec, cache_dir: Path, progress: SilentProgress,
                metric: Metric | None = None) -> "TextClassification":
        """Fine-tune a new head (cached), then the teacher's logits on the training split (cached), and its last-layer
        states there when the state transfer is on (cached)."""
        splits, training = loaded.splits, spec.training
        train = tokenize(loaded.tokenizer, splits.train.texts, splits.train.labels, max_length=spec.data.max_length)
        teacher = loaded.teacher
        if loaded.new_head:
            progress.note(f"fine-tuning the teacher's new classification head ({training.teacher_epochs} epochs; cached)")
            teacher = finetune_teacher(teacher, train, epochs=training.teacher_epochs, lr=training.teacher_lr,
                                       seed=spec.search.seed, batch_size=training.batch_size, cache_dir=cache_dir / "teachers",
                                       progress=functools.partial(progress.training, "fine-tuning the teacher"))
        teacher_key = state_fingerprint(teacher)
        logits = teacher_logits(teacher, train, cache_dir=cache_dir / "logits", teacher_fingerprint=teacher_key)
        states = None
        if training.state_weight > 0:
            progress.note("the teacher's last-layer states on the training split (state transfer; cached)")
            states = teacher_states(teacher, train, cache_dir / "logits", teacher_key)
        return cls(teacher, loaded.tokenizer, train, logits, splits, loaded.space, spec, loaded.new_head, teacher_key,
                   metric, states)

    @property
    def teacher(self) -> nn.Module:
        """The classifier, fine-tuned when its head was new."""
        return self.model

    @property
    def teacher_fine_tuned(self) -> bool:
        """Whether the head was new and fine-tuned before the search."""
        return self.fine_tuned

    @functools.cached_property
    def teacher_shape(self) -> TeacherShape:
        """Read off the teacher's config through its family's attribute names."""
        return shape_of(self.model)

    @functools.cached_property
    def cache_identity(self) -> tuple[str, ...]:
        """The teacher's weight hash, the tokenized training split's fingerprint and how students are optimised."""
        return (self.teacher_key, self.train.fingerprint(), OPTIMIZER)

    @property
    def space(self) -> Space:
        """The spec's preset for the teacher's shape, with its knob overrides."""
        return self.search_space

    @property
    def objective_name(self) -> str:
        """The family's metric (accuracy), or the user metric's function name."""
        return self.metric_name if self.metric is None else getattr(self.metric, "__name__", "custom metric")

    def anchor_candidates(self, space: Space) -> list[Candidate]:
        """The teacher, then its layer-dropped slices (see `encoder_anchors`)."""
        return encoder_anchors(self.teacher_shape, space)

    # -- the steps of a trial -------------------------------------------------------------------------------

    def gate_vocab(self) -> int:
        """Token embeddings the stand-in keeps (see GATE_VOCAB)."""
        return min(int(self.model.config.vocab_size), GATE_VOCAB)

    @property
    def stand_in_identity(self) -> tuple[Any, ...]:
        """The stand-in's vocabulary size (capped at GATE_VOCAB) and the input shape its OpenVINO builds are fixed to."""
        return (self.gate_vocab(), "openvino shape", self.openvino_shape())

    def openvino_shape(self) -> Shape | None:
        """The input shape this run's OpenVINO artifacts are fixed to (`openvino_input_shape` of the target)."""
        target = self.spec.target
        return openvino_input_shape(target.batch_size, target.seq_len, self.spec.data.max_length)

    def stand_in(self, candidate: Candidate) -> nn.Module:
        """The candidate's shape with random weights and at most GATE_VOCAB token embeddings."""
        return shaped_like(self.model, candidate.layers, candidate.hidden, candidate.heads, candidate.ffn,
                           head_dim=candidate.head_dim, vocab_size=self.gate_vocab())

    def deployed_size_bytes(self, stand_in: Artifact) -> int:
        """The stand-in's size with its token table scaled back to the teacher's vocabulary."""
        return full_table_size_bytes(stand_in, int(self.model.config.vocab_size))

    def make_student(self, candidate: Candidate) -> nn.Module:
        """The student sliced from the teacher's weights (autotune.compress.student)."""
        return make_student(self.model, candidate.layers, candidate.hidden, candidate.heads, candidate.ffn,
                            head_dim=candidate.head_dim)

    def distil(self, student: nn.Module, candidate: Candidate, *, epochs: int, lr: float, seed: int,
               pruning: PruningSchedule | None, on_step: Steps | None = None) -> nn.Module:
        """KD on the cached teacher logits plus the labels (and the state transfer onto the cached teacher states when
        `training.state_weight` > 0), sparsified along `pruning`."""
        training = self.spec.training
        return distill(
            student, None, self.train, epochs=epochs, lr=lr, temperature=training.temperature, alpha=training.alpha,
            state_weight=training.state_weight, batch_size=training.batch_size, seed=seed, teacher_logits=self.logits,
            teacher_last_states=self.last_states, pruning_schedule=pruning, progress=on_step,
        ).model.eval()

    def export(self, model: nn.Module, out_dir: Path) -> Artifact:
        """An fp32 ONNX classifier artifact with the tokenizer beside it."""
        return export_artifact(model, self.tokenizer, out_dir, labels=self.splits.train.label_names)

    def quantize(self, plain: Artifact, out_dir: Path, bits: int, recipe: Recipe) -> Artifact:
        """ORT's transformer fusion, then the bit width; or, where the recipe runs int8 in OpenVINO, NNCF's static
        int8 calibrated on the training split (profilers/recipes.py says which on this CPU)."""
        if bits == 8 and recipe.int8_engine == "openvino":
            return openvino_int8_artifact(plain, out_dir, self.calibration_feeds(), self.openvino_shape())
        return quantize_artifact(plain, out_dir, bits=bits, recipe=recipe)

    def calibration_feeds(self) -> list[dict[str, np.ndarray]]:
        """CALIBRATION_ROWS rows of the training split in batches padded to their longest row: static int8's
        activation ranges come from the user's own data."""
        texts = self.splits.train.texts[:CALIBRATION_ROWS]
        return [batch.feeds() for batch in encode_batches(self.tokenizer, texts, batch_size=CALIBRATION_BATCH,
                                                          max_length=self.spec.data.max_length)]

    def achieved_sparsity(self, model: nn.Module) -> float:
        """The zeros among the encoder's prunable weights (what its students are sparsified in)."""
        return measured_sparsity(model)

    def build(self, model: nn.Module, candidate: Candidate, out_dir: Path, recipe: Recipe) -> Artifact:
        """The fp32 export (in a scratch directory beside `out_dir`), then fusion and the candidate's bit width."""
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        with owned_temporary_directory(STAGING, out_dir.parent) as tmp:
            return self.quantize(self.export(model, tmp / "fp32"), out_dir, candidate.bits, recipe)

    def fp32_deployments(self, out_dir: Path) -> dict[str, Artifact]:
        """The teacher's export with ONNX Runtime's transformer fusion and without, and as OpenVINO's fp32 IR where it
        is installed (inputs fixed as its int8 students' are): fusion measured 0.95-1.16x across CPUs and OpenVINO
        0.91x (AVX2) to 1.24x (AVX-512 VNNI), so only timing says which is the fastest reference."""
        plain = self.export(self.teacher, out_dir / "unfused")
        deployments = {"fp32 fused": quantize_artifact(plain, out_dir / "fused", bits=32), "fp32 unfused": plain}
        if openvino_installed():
            deployments["fp32 openvino"] = openvino_fp32_artifact(plain, out_dir / "openvino", self.openvino_shape())
        return deployments

    def request(self, artifact: Artifact, timing: Timing) -> OnnxRequest:
        """One forward pass of synthetic token ids at the target's batch and sequence length."""
        return OnnxRequest(model_path=str(artifact.model_path), input_names=artifact.input_names,
                           batch_size=timing.batch_size, seq_len=timing.seq_len, vocab_size=artifact.vocab_size,
                           threads=timing.threads, providers=providers_for(timing.device), engine=artifact.engine)

    def time(self, artifact: Artifact, timing: Timing, settings: MeasureSettings) -> Timed:
        """The forward pass's latency ("latency"), in a fresh child process."""
        return Timed({"latency": measure_onnx_isolated(self.request(artifact, timing), settings)})

    def time_together(self, artifacts: list[Artifact], timing: Timing) -> list[Timed]:
        """The forward passes alternating in one child process (profilers.isolated.measure_onnx_interleaved)."""
        stats = measure_onnx_interleaved([self.request(a, timing) for a in artifacts])
        return [Timed({"latency": s}) for s in stats]

    def split_size(self, split: str) -> int:
        """The number of labelled texts in that split."""
        return len(getattr(self.splits, split))

    def score(self, artifact: Artifact, split: str, timing: Timing) -> Score:
        """Accuracy (and macro-F1) of the artifact, or the user's metric over its logits when one was given."""
        data: LabeledTexts = getattr(self.splits, split)
        runtime = artifact_runtime(artifact, threads=timing.threads, device=timing.device)
        max_length = self.spec.data.max_length
        if self.metric is None:
            result = evaluate(runtime.run, self.tokenizer, data, max_length=max_length)
            return Score(result.accuracy, {"macro_f1": result.macro_f1})
        logits = predict_logits(runtime.run, self.tokenizer, data.texts, max_length=max_length)
        return Score(float(self.metric(np.asarray(data.labels), logits)), {"macro_f1": None})
