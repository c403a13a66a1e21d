"""Causal language models, the second task family: a llama-family decoder, plain text, perplexity.

Its students are the teacher with fewer decoder blocks (the least important by angular distance removed) and a
narrower FFN (the least active neurons removed), healed by distillation on the teacher's top-k next-token log-
probabilities for a budget of training tokens (`heal_tokens`; one "epoch" of a trial is that budget, so a finalist
refined one more epoch heals twice the budget from the start). Its artifact is the ONNX Runtime GenAI model the
builder writes, with a KV cache and the candidate's weight-only quantization (int8/int4, method, block size, LM-head
bits, sensitive layers at int8); it is timed by generating (time to first token of a prompt, per-token decode at a
context, peak memory) and scored by perplexity on held-out windows, the objective being the teacher's perplexity
over the candidate's (1.0: as good as the teacher), with top-1 agreement beside it.

Everything slow and reusable is cached under the cache root: the GGUF conversion and exports of the teacher
(`autotune.tasks.lm_exports`), the teacher's top-k targets on the training windows, its block and FFN importance.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import numpy as np
import torch
from torch import nn

from autotune.caches import MANIFEST, STAGING, cached_dir, key_of, owned_temporary_directory
from autotune.compress import PruningSchedule
from autotune.config import TuneSpec
from autotune.runtime import Artifact
from autotune.runtime.export import write_artifact_json
from autotune.runtime.genai import LMArtifact, WeightOnly, export_causal_lm, greedy_continuation
from autotune.tasks.base import Score, Steps, TaskFamily, Timed, Timing
from autotune.tasks.data import DataError
from profilers.decode_predictor import DecoderConfig, DecoderDims, weight_bytes_read
from profilers.generation import GenerationRequest, GenerationStats, measure_generation, measure_generations
from profilers.latency import MeasureSettings
from profilers.recipes import Recipe
from search_spaces import Candidate, Space, SpaceError, TeacherShape, preset, with_overrides
from search_spaces.candidate import HEAD_INT8_SHARE

if TYPE_CHECKING:
    from autotune.compress.healing import TeacherTargets
    from autotune.progress import SilentProgress

#: Held-out windows a candidate is scored on (evenly spaced over the split): each is one forward pass of the
#: artifact, so this many keep scoring within seconds on a CPU while covering every document.
SCORED_WINDOWS = 16
#: Windows of training text the block and FFN importance are measured on.
CALIBRATION_WINDOWS = 16
#: Next-token candidates per position kept of the teacher's distribution (what fits a cache on disk).
TOP_K = 32
#: Windows per healing step (a batch of long windows; fits a CPU's memory for 100M-parameter models).
HEAL_BATCH = 4
#: Generation runs per timing: `settings.min_runs` divided by this, at least 3 (each run is a prefill and 4 rounds of
#: 16 decoded tokens, `profilers.generation`): a trial's evaluation 5 runs (320 decode samples), its gate 3 (192).
RUNS_PER_SAMPLE = 8
#: Generation runs per artifact when several are timed in the same minutes (the selection's re-measurements, three
#: rounds for a candidate it confirms): 256 decode samples each; a SmolLM2 fp32 run takes about 2.5 seconds.
TOGETHER_RUNS = 4
#: Tokens of the prompt and of the continuation in the report's sample generations.
SAMPLE_PROMPT_TOKENS, SAMPLE_NEW_TOKENS = 48, 48
MB = 1024 * 1024


def timed_of(stats: GenerationStats) -> Timed:
    """A generation's latencies by name ("decode", "ttft") and its peak memory in MB."""
    return Timed({"decode": stats.decode, "ttft": stats.ttft}, stats.peak_rss_bytes / MB)


@dataclass(frozen=True)
class LMWindows:
    """Token windows per split ([n, window] int64): all of the training split's that healing may use, and
    SCORED_WINDOWS of validation and test."""

    train: torch.Tensor
    validation: np.ndarray
    test: np.ndarray

    def fingerprint(self) -> str:
        """A hash of the training windows: what a student's cache key depends on besides the teacher."""
        return hashlib.sha256(self.train.numpy().tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class LoadedLMRun:
    """What `CausalLM.load` read: the teacher's Hugging Face directory and model, the windows, and the space."""

    hf_dir: Path
    teacher: nn.Module
    windows: LMWindows
    space: Space


def evenly_spaced(windows: torch.Tensor, count: int) -> torch.Tensor:
    """`count` windows spread evenly over all of them (every document represented), or all when there are fewer."""
    if len(windows) <= count:
        return windows
    return windows[torch.linspace(0, len(windows) - 1, count).round().long()]


def train_windows_needed(space: Space, training_epochs: int, window: int) -> int:
    """Windows of training text the largest healing budget of the space reads (finalists' included), at least the
    calibration's: the teacher's targets are computed on these and no more."""
    tokens = max((t for t in space.knob("heal_tokens").values()), default=0) if space.has("heal_tokens") else 0
    return max(CALIBRATION_WINDOWS, math.ceil(tokens * training_epochs / window))


def load_windows(spec: TuneSpec, hf_dir: Path, space: Space) -> LMWindows:
    """The spec's text split by document and cut into windows of `data.max_length` tokens, as the teacher
    tokenizes it; `data.limit` caps the training windows."""
    from transformers import AutoTokenizer

    from autotune.tasks.lm_text import load_text, token_windows

    data = spec.data
    splits = load_text(data.path, column=data.text_column if data.path.endswith((".jsonl", ".ndjson", ".csv")) else None,
                       validation_fraction=data.split.validation, test_fraction=data.split.test, seed=data.split.seed)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    length = data.max_length
    train = token_windows(tokenizer, splits.train, length)
    needed = train_windows_needed(space, 1 + spec.training.refine_epochs, length)
    train = evenly_spaced(train, min(needed, data.limit or needed))
    held_out = {name: evenly_spaced(token_windows(tokenizer, getattr(splits, name), length), SCORED_WINDOWS).numpy()
                for name in ("validation", "test")}
    return LMWindows(train.contiguous(), held_out["validation"], held_out["test"])


def teacher_shape_of(config: Any) -> TeacherShape:
    """A decoder's architecture as the search bounds it: blocks, hidden size, attention heads, FFN width."""
    return TeacherShape(int(config.num_hidden_layers), int(config.hidden_size), int(config.num_attention_heads),
                        int(config.intermediate_size))


def weight_only(candidate: Candidate, vocab_size: int) -> WeightOnly | None:
    """The candidate's weight-only scheme (None at fp32); a knob the space does not search takes the builder's
    default (round-to-nearest, block 32, the LM head at the body's width, no int8 layers). MatMulNBits computes
    with int8 activations on every CPU (DECODE_ACCURACY_LEVEL says why), whatever an encoder's recipe chose.
    With rtn-offset, a 4-bit LM head keeps its first HEAD_INT8_SHARE of the vocabulary's rows at int8."""
    if candidate.bits == 32:
        return None
    if candidate.bits not in (4, 8):
        raise ValueError(f"a causal LM's linears are fp32, int8 or int4, not {candidate.bits} bits")
    method = candidate.method or "rtn"
    four_bit_head = (candidate.head_bits or candidate.bits) == 4
    rows = round(vocab_size * HEAD_INT8_SHARE) if method == "rtn-offset" and four_bit_head else 0
    return WeightOnly(bits=candidate.bits, block_size=candidate.block_size or 32, method=method,
                      head_bits=candidate.head_bits, sensitive_int8=bool(candidate.sensitive_int8), head_int8_rows=rows)


def artifact_of(directory: Path, config: Any, bits: int) -> Artifact:
    """The GenAI model in `directory` described as an Artifact (artifact.json written), so that the run's caches,
    selection and deployment treat it like any other."""
    import onnx

    onnx_path = directory / "model.onnx"
    graph = onnx.load(str(onnx_path), load_external_data=False)
    artifact = Artifact(
        dir=directory, model_path=onnx_path, family=str(config.model_type),
        input_names=tuple(i.name for i in graph.graph.input), num_heads=int(config.num_attention_heads),
        hidden_size=int(config.hidden_size), num_layers=int(config.num_hidden_layers), vocab_size=int(config.vocab_size),
        bits=bits, fused=True, opset=next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), 0),
        size_bytes=LMArtifact(directory, None).size_bytes)
    write_artifact_json(artifact)
    return artifact


def link_tree(source: Path, target: Path) -> None:
    """`source` copied to `target`, by hard links where the file system allows (exports are hundreds of MB), without
    its cache manifest (the copy gets its own)."""
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(MANIFEST))


@dataclass(frozen=True, eq=False)
class CausalLM(TaskFamily):
    """A causal LM ready for trials: the teacher, its windows, and lazily its targets, importance and reference
    predictions (computed once per run where a trial first needs them, cached on disk across runs)."""

    name: ClassVar[str] = "causal-lm"
    metric_name: ClassVar[str] = "ppl ratio"

    hf_dir: Path
    model: nn.Module
    windows: LMWindows
    search_space: Space
    spec: TuneSpec
    cache_dir: Path
    teacher_key: str
    progress: Any
    #: The teacher's scores by split (perplexity and its top-1 predictions): the reference every candidate is
    #: scored against, filled on first use.
    references: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def load(cls, spec: TuneSpec) -> LoadedLMRun:
        """Convert or check the teacher, read and window the text, derive the space: every mistake surfaces here."""
        from transformers import AutoModelForCausalLM

        from autotune.tasks.lm_exports import LMShape, max_positions
        from autotune.tasks.lm_models import prepare_causal_lm

        if "head_dim" in spec.space.knobs:
            raise SpaceError("knob 'head_dim' prunes an encoder's attention heads; a causal LM keeps its teacher's "
                             "heads (its KV cache and attention kernels are shaped by them)")
        if spec.model.trust_remote_code or spec.model.allow_pickle:
            raise DataError("model.trust_remote_code and model.allow_pickle do not apply to causal LMs: they load from "
                            "safetensors or a GGUF, with the architectures the exporter supports")
        hf_dir = prepare_causal_lm(spec.model.path)
        t = spec.target
        LMShape(t.prompt_len, t.context_len, spec.data.max_length).check(max_positions(hf_dir))
        teacher = AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32, use_safetensors=True).eval()
        space = with_overrides(preset(spec.space.preset, teacher_shape_of(teacher.config)), spec.space.knobs)
        return LoadedLMRun(hf_dir, teacher, load_windows(spec, hf_dir, space), space)

    @classmethod
    def prepare(cls, loaded: LoadedLMRun, spec: TuneSpec, cache_dir: Path, progress: SilentProgress,
                metric: Any = None) -> "CausalLM":
        """The run's family; the teacher needs no training, and its targets wait until a student needs them."""
        if metric is not None:
            raise ValueError("a custom metric applies to text classification; a causal LM is scored by perplexity")
        from autotune.tasks.lm_exports import weights_identity

        teacher_key = key_of("lm-teacher", str(loaded.hf_dir), weights_identity(loaded.hf_dir))
        return cls(loaded.hf_dir, loaded.teacher, loaded.windows, loaded.space, spec, cache_dir, teacher_key, progress)

    # -- facts of the run -------------------------------------------------------------------------------------

    @property
    def teacher(self) -> nn.Module:
        """The causal LM as given (fp32)."""
        return self.model

    @property
    def teacher_fine_tuned(self) -> bool:
        """A causal LM's teacher is used as it is."""
        return False

    @functools.cached_property
    def teacher_shape(self) -> TeacherShape:
        """Blocks, hidden size, heads and FFN width of the teacher."""
        return teacher_shape_of(self.model.config)

    @functools.cached_property
    def cache_identity(self) -> tuple[str, ...]:
        """The teacher's weights and the training windows."""
        return (self.teacher_key, self.windows.fingerprint())

    @property
    def space(self) -> Space:
        """The spec's preset (llama-default unless named) for the teacher's shape, with its knob overrides."""
        return self.search_space

    @property
    def objective_name(self) -> str:
        """The teacher's perplexity over the candidate's: 1.0 is as good as the teacher."""
        return self.metric_name

    def anchor_candidates(self, space: Space) -> list[Candidate]:
        """The teacher's quantizations a user would try first, without any training, most telling first: int4 with
        offsets kept (rtn-offset, the LM head at int4 with its frequent rows at int8, then at int8), int8, the model
        builder's default int4 (round-to-nearest, block 32: the reference a user would build by hand) and int4 in
        the space's largest blocks (the fastest)."""
        t = self.teacher_shape

        def anchor(bits: int, method: str, block_size: int, head_bits: int) -> Candidate:
            values = {"block_size": block_size, "method": method, "head_bits": head_bits, "sensitive_int8": False,
                      "heal_tokens": 0}
            chosen = {name: value for name, value in values.items() if space.has(name)}
            return Candidate.canonical(layers=t.layers, hidden=t.hidden, heads=t.heads, ffn=t.ffn, bits=bits, **chosen)

        largest = max(space.knob("block_size").values()) if space.has("block_size") else 32
        return [anchor(4, "rtn-offset", 32, 4), anchor(4, "rtn-offset", 32, 8), anchor(8, "rtn", 32, 8),
                anchor(4, "rtn", 32, 4), anchor(4, "rtn", largest, 4)]

    # -- the steps of a trial ---------------------------------------------------------------------------------

    @property
    def stand_in_identity(self) -> tuple[Any, ...]:
        """Everything of the teacher's config that shapes a stand-in besides the candidate's knobs."""
        c = self.model.config
        return (int(c.vocab_size), int(getattr(c, "num_key_value_heads", c.num_attention_heads)),
                int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads),
                bool(getattr(c, "tie_word_embeddings", False)), self.model.config.model_type)

    def stand_in(self, candidate: Candidate) -> nn.Module:
        """The teacher's architecture with the candidate's blocks and FFN width, random weights (full vocabulary:
        the LM head is most of a small model's decode); at the teacher's own shape, the teacher: its export at the
        candidate's precision is cached per machine, so the gate builds what the trial then deploys."""
        if (candidate.layers, candidate.ffn) == (self.teacher_shape.layers, self.teacher_shape.ffn):
            return self.model
        config = copy.deepcopy(self.model.config)
        config.num_hidden_layers, config.intermediate_size = candidate.layers, candidate.ffn
        if getattr(config, "layer_types", None):
            config.layer_types = config.layer_types[:candidate.layers]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return type(self.model)(config).eval()

    def decoder_config(self, candidate: Candidate, prompt_len: int) -> DecoderConfig:
        """The candidate as the decode predictor sees it (`profilers.decode_predictor`): the bytes of weights a
        token reads at its precision, its blocks and bits, the prompt a TTFT prefills."""
        c = self.model.config
        kv_heads, head_dim = self.stand_in_identity[1:3]
        dims = DecoderDims(candidate.layers, int(c.hidden_size), kv_heads * head_dim, candidate.ffn, int(c.vocab_size))
        scheme = weight_only(candidate, int(c.vocab_size))
        if scheme is None:
            return DecoderConfig(weight_bytes_read(dims, 32, 32, 32, False), candidate.layers, 32, prompt_len)
        read = weight_bytes_read(dims, scheme.bits, scheme.block_size, scheme.lm_head_bits, scheme.sensitive_int8,
                                 offsets=scheme.method == "rtn-offset", head_int8_rows=scheme.head_int8_rows)
        return DecoderConfig(read, candidate.layers, scheme.bits, prompt_len)

    def deployed_size_bytes(self, stand_in: Artifact) -> int:
        """The stand-in has the trained model's every dimension: its size is the deployed size."""
        return stand_in.size_bytes

    @functools.cached_property
    def importance(self) -> tuple[tuple[float, ...], tuple[torch.Tensor, ...]]:
        """(block importance, FFN neuron importance per block) of the teacher on calibration windows of the
        training text, cached on disk."""
        from autotune.compress import block_importance, ffn_importance

        path = self.cache_dir / "lm-importance" / f"{key_of('importance', *self.cache_identity)}.pt"
        if path.exists():
            saved = torch.load(path, weights_only=True)
            return tuple(saved["blocks"]), tuple(saved["ffn"])
        calibration = evenly_spaced(self.windows.train, CALIBRATION_WINDOWS)
        self.progress.note(f"measuring block and FFN importance on {len(calibration)} training windows (cached)")
        blocks, ffn = block_importance(self.model, calibration), ffn_importance(self.model, calibration)
        path.parent.mkdir(parents=True, exist_ok=True)
        with owned_temporary_directory(STAGING, path.parent) as tmp:
            torch.save({"blocks": list(blocks), "ffn": list(ffn)}, tmp / path.name)
            os.replace(tmp / path.name, path)
        return blocks, ffn

    def make_student(self, candidate: Candidate) -> nn.Module:
        """The teacher's FFN narrowed to its most active neurons, then its most important blocks kept."""
        from autotune.compress import blocks_to_keep, drop_blocks, narrow_ffn

        blocks, ffn = self.importance
        student = self.model
        if candidate.ffn < self.teacher_shape.ffn:
            student = narrow_ffn(student, candidate.ffn, ffn)
        if candidate.layers < self.teacher_shape.layers:
            student = drop_blocks(student, blocks_to_keep(blocks, candidate.layers))
        return student if student is not self.model else copy.deepcopy(student)  # healing trains in place

    @functools.cached_property
    def targets(self) -> TeacherTargets:
        """The teacher's top-k next-token log-probabilities on the training windows, computed once per teacher and
        windows (cached on disk)."""
        from autotune.compress.healing import TeacherTargets, teacher_targets

        k = min(TOP_K, int(self.model.config.vocab_size))  # a tiny test vocabulary has fewer
        final = self.cache_dir / "lm-targets" / key_of("targets", *self.cache_identity, k)

        def build(staging: Path) -> None:
            self.progress.note(f"computing the teacher's top-{k} targets on {len(self.windows.train)} training "
                               "windows (once; cached)")
            teacher_targets(self.model, self.windows.train, k=k).save(staging / "targets.pt")

        cached_dir(final, "targets.pt", build)
        return TeacherTargets.load(final / "targets.pt")

    def distil(self, student: nn.Module, candidate: Candidate, *, epochs: int, lr: float, seed: int,
               pruning: PruningSchedule | None, on_step: Steps | None = None) -> nn.Module:
        """Healed on the teacher's top-k targets for `epochs` x the candidate's `heal_tokens` training tokens (none:
        returned as it is). Sparsity has no CPU kernel for decoders, so `pruning` must be None."""
        from autotune.compress.healing import heal

        if pruning is not None:
            raise ValueError("a causal LM's students are not sparsified (no sparse kernel in ONNX Runtime's CPU provider)")
        tokens = (candidate.heal_tokens or 0) * epochs
        if tokens == 0:
            return student
        heal(student, self.windows.train, self.targets, tokens=tokens, lr=lr, batch_size=HEAL_BATCH, seed=seed,
             on_step=on_step)
        return student

    def achieved_sparsity(self, model: nn.Module) -> float:
        """A causal LM's students are never sparsified."""
        return 0.0

    def build(self, model: nn.Module, candidate: Candidate, out_dir: Path, recipe: Recipe) -> Artifact:
        """The builder's GenAI export at the candidate's weight-only scheme, its prompt's LM head on the last token
        alone (the baseline's too, so TTFT gains are the compression's); the teacher's exports are cached per
        machine (autotune.lm_measure), a student is saved beside `out_dir` first."""
        from autotune.tasks.lm_exports import cached_export, save_causal_lm

        weights = weight_only(candidate, int(model.config.vocab_size))
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        if model is self.model:
            link_tree(cached_export(self.hf_dir, weights, last_logits_only=True).directory, out_dir)
        else:
            with owned_temporary_directory(STAGING, out_dir.parent) as tmp:
                export_causal_lm(save_causal_lm(model, self.hf_dir, tmp / "hf"), out_dir, weights,
                                 last_logits_only=True)
        return artifact_of(out_dir, model.config, candidate.bits)

    def request(self, artifact: Artifact, timing: Timing, runs: int) -> GenerationRequest:
        """A generation of the target's prompt and context lengths."""
        return GenerationRequest(str(artifact.dir), prompt_len=timing.prompt_len or timing.seq_len,
                                 context_len=timing.seq_len, threads=timing.threads, vocab_size=artifact.vocab_size,
                                 runs=runs)

    def time(self, artifact: Artifact, timing: Timing, settings: MeasureSettings) -> Timed:
        """TTFT and per-token decode ("ttft", "decode") and peak memory, generating in a fresh child process."""
        runs = max(3, settings.min_runs // RUNS_PER_SAMPLE)
        return timed_of(measure_generation(self.request(artifact, timing, runs)))

    def time_together(self, artifacts: list[Artifact], timing: Timing) -> list[Timed]:
        """Each artifact generating in its own child process, taking turns of one run (`measure_generations`):
        TOGETHER_RUNS runs each, since the selection repeats these measurements."""
        requests = [self.request(artifact, timing, TOGETHER_RUNS) for artifact in artifacts]
        return [timed_of(stats) for stats in measure_generations(requests)]

    def split_size(self, split: str) -> int:
        """Windows of that split: all the training windows healing may read, SCORED_WINDOWS held out."""
        return len(getattr(self.windows, split))

    def reference(self, split: str, threads: int) -> Any:
        """The fp32 teacher's score on `split` (perplexity, top-1 predictions), computed once per run."""
        from autotune.tasks.lm_exports import cached_export
        from autotune.tasks.lm_quality import score_lm

        if split not in self.references:
            teacher = cached_export(self.hf_dir, None, last_logits_only=True)
            self.references[split] = score_lm(teacher.directory, getattr(self.windows, split), threads=threads)
        return self.references[split]

    def score(self, artifact: Artifact, split: str, timing: Timing) -> Score:
        """The teacher's perplexity over the artifact's on `split` (the objective), the perplexity itself and its
        top-1 agreement with the teacher."""
        from autotune.tasks.lm_quality import score_lm

        reference = self.reference(split, timing.threads)
        scored = score_lm(artifact.dir, getattr(self.windows, split), reference=reference.predictions,
                          threads=timing.threads)
        return Score(reference.perplexity / scored.perplexity,
                     {"perplexity": scored.perplexity, "teacher_perplexity": reference.perplexity,
                      "agreement": scored.agreement})

    def sample_outputs(self, artifacts: Mapping[str, Artifact]) -> dict[str, Any] | None:
        """One prompt from the test split and each artifact's greedy continuation of it, side by side."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(self.hf_dir)
        prompt = self.windows.test[0][:SAMPLE_PROMPT_TOKENS].tolist()
        return {"prompt": tokenizer.decode(prompt), "outputs": {
            name: tokenizer.decode(greedy_continuation(artifact.dir, prompt, SAMPLE_NEW_TOKENS))
            for name, artifact in artifacts.items()}}
