"""Knowledge distillation (soft targets + hard labels), teacher fine-tuning, and their on-disk caches.

Training is the bottleneck of a trial on a small CPU box, so the loop is built to waste nothing:
- Batches are padded per batch and grouped by length: examples are sorted by token count, cut into
  batches, and the batch order is shuffled with the seed. Padding every batch to the longest possible
  sequence would spend most FLOPs on pad tokens.
- Teacher logits are computed once per (teacher, data) and cached to an .npy file (a cache entry of
  autotune.caches: a header line, then the array); a trial then never runs the teacher unless the
  hidden-state loss asks for its hidden states.
- A fine-tuned teacher is cached as a safetensors directory, so a study fine-tunes it once.

Everything is seeded: the same seed on the CPU gives bit-identical weights. The global RNG state of the
caller is left as it was (`torch.random.fork_rng`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autotune.caches import cached_dir_value, cached_file
from autotune.compress.pruning import PruningSchedule, apply_masks, compute_masks, measured_sparsity
from autotune.compress.student import even_layer_indices
from autotune.models import shape_of, state_fingerprint

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TokenizedData:
    """Token ids per example (unpadded) and integer labels; `max_length` is the truncation used, for cache keys."""

    input_ids: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    max_length: int | None = None

    def __post_init__(self) -> None:
        if len(self.input_ids) != len(self.labels):
            raise ValueError(f"TokenizedData has {len(self.input_ids)} token sequences but {len(self.labels)} labels.")
        if not self.input_ids:
            raise ValueError("TokenizedData is empty; at least one example is needed.")
        object.__setattr__(self, "input_ids", tuple(tuple(int(t) for t in ids) for ids in self.input_ids))
        object.__setattr__(self, "labels", tuple(int(y) for y in self.labels))

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> tuple[int, ...]:
        """Token count per example: what length-grouped batching sorts by."""
        return tuple(len(ids) for ids in self.input_ids)

    def fingerprint(self) -> str:
        """A sha256 over truncation, token ids and labels: the data's part of the teacher-logit and fine-tuned-teacher
        cache keys, so a changed dataset or max_length never reads a stale entry."""
        digest = hashlib.sha256(repr((self.max_length, self.input_ids, self.labels)).encode())
        return digest.hexdigest()


def tokenize(tokenizer, texts: Sequence[str], labels: Sequence[int], max_length: int = 64) -> TokenizedData:
    """Tokenise without padding (padding happens per batch), truncating to `max_length` tokens."""
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length, padding=False)
    return TokenizedData(tuple(map(tuple, encoded["input_ids"])), tuple(labels), max_length)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int | None) -> list[list[int]]:
    """Index batches of similar lengths; with a seed, ties are broken and batch order shuffled by it.

    Sorting by length keeps padding per batch small; shuffling the batch order (not the members) keeps
    the gradient steps from marching from short to long examples. `seed=None` gives a fixed order, used
    for inference.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    order = list(range(len(lengths)))
    rng = random.Random(seed)
    if seed is not None:
        rng.shuffle(order)
    order.sort(key=lambda i: lengths[i])
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if seed is not None:
        rng.shuffle(batches)
    return batches


def collate(data: TokenizedData, indices: Sequence[int], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Model inputs padded to the longest example of this batch, and the labels."""
    width = max(len(data.input_ids[i]) for i in indices)
    ids = torch.full((len(indices), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(indices), width), dtype=torch.long)
    for row, i in enumerate(indices):
        seq = data.input_ids[i]
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = 1
    labels = torch.tensor([data.labels[i] for i in indices], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask}, labels


def _pad_id(model: nn.Module) -> int:
    pad = getattr(model.config, "pad_token_id", None)
    return 0 if pad is None else int(pad)


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npy_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


@torch.no_grad()
def _predict(model: nn.Module, data: TokenizedData, batch_size: int) -> np.ndarray:
    was_training = model.training
    model.eval()
    logits = None
    for indices in length_grouped_batches(data.lengths, batch_size, seed=None):
        inputs, _ = collate(data, indices, _pad_id(model))
        out = model(**inputs).logits.float().numpy()
        logits = np.zeros((len(data), out.shape[1]), dtype=np.float32) if logits is None else logits
        logits[indices] = out
    model.train(was_training)
    return logits


def teacher_logits(
    teacher: nn.Module,
    data: TokenizedData,
    batch_size: int = 64,
    cache_dir: str | Path | None = None,
    teacher_fingerprint: str | None = None,
) -> np.ndarray:
    """Teacher logits [examples, labels] in data order, read from / written to `cache_dir` when given.

    The cache key hashes the teacher's identity (`teacher_fingerprint`, else a hash of its weights) and
    the data (token ids, labels, max_length), so a changed teacher or dataset never reads stale logits.
    """
    if cache_dir is None:
        return _predict(teacher, data, batch_size)
    identity = teacher_fingerprint or state_fingerprint(teacher)
    key = hashlib.sha256(f"{identity}|{data.fingerprint()}".encode()).hexdigest()[:32]
    path = Path(cache_dir) / f"teacher-logits-{key}.npy"
    logits, hit = cached_file(path, lambda: _predict(teacher, data, batch_size), _npy_bytes, _npy_array,
                              valid=lambda array: array.shape[0] == len(data))
    log.info("Teacher logits %s: %s", "cache hit" if hit else "cached", path)
    return logits


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD term: KL(teacher_T || student_T) * T^2, batch mean.

    The teacher's softened distribution is the target (the usual direction); T^2 keeps the gradient scale
    independent of T, so alpha means the same thing at every temperature.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature**2


def hidden_state_loss(
    student_states: Sequence[torch.Tensor],
    teacher_states: Sequence[torch.Tensor],
    layer_map: Sequence[int],
    mask: torch.Tensor,
) -> torch.Tensor:
    """Mean MSE between student layer outputs and their teacher layers (embeddings paired with embeddings).

    `layer_map[i]` is the teacher layer that student layer i was copied from; pad positions are ignored.
    """
    pairs = [(0, 0)] + [(i + 1, t + 1) for i, t in enumerate(layer_map)]
    weight = mask.unsqueeze(-1).float()
    total = student_states[0].new_zeros(())
    for s, t in pairs:
        diff = (student_states[s] - teacher_states[t]) ** 2 * weight
        total = total + diff.sum() / (weight.sum() * diff.shape[-1]).clamp_min(1.0)
    return total / len(pairs)


@dataclass(frozen=True)
class DistillResult:
    """The trained model (same object, trained in place), loss per step, mean loss per epoch, final sparsity."""

    model: nn.Module
    losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    sparsity: float | None = None


LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor, list[int]], torch.Tensor]


def _train(
    model: nn.Module,
    data: TokenizedData,
    loss_fn: LossFn,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    pruning_schedule: PruningSchedule | None,
    progress: Progress | None,
) -> DistillResult:
    """The one training loop: AdamW, linear decay to 0, length-grouped batches, optional gradual pruning."""
    if epochs < 1 or lr <= 0:
        raise ValueError(f"Training needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        plan = [length_grouped_batches(data.lengths, batch_size, seed + epoch) for epoch in range(epochs)]
        total = sum(len(batches) for batches in plan)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / total)
        events = pruning_schedule.events(total) if pruning_schedule else {}
        masks: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        epoch_losses: list[float] = []
        model.train()
        step = 0
        for epoch, batches in enumerate(plan):
            running = 0.0
            for indices in batches:
                if step in events:
                    masks = compute_masks(
                        model, events[step], pattern=pruning_schedule.pattern, scope=pruning_schedule.scope,
                        include_head=pruning_schedule.include_head, previous=masks or None,
                    )
                    apply_masks(model, masks)
                    log.info("Step %d: pruned to %.3f sparsity", step,
                             measured_sparsity(model, include_head=pruning_schedule.include_head))
                inputs, labels = collate(data, indices, _pad_id(model))
                loss = loss_fn(model, inputs, labels, indices)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                if masks:
                    apply_masks(model, masks)
                step += 1
                value = loss.item()
                losses.append(value)
                running += value
                if progress is not None:
                    progress(step, total, value)
            epoch_losses.append(running / len(batches))
            log.info("Epoch %d/%d: mean loss %.4f", epoch + 1, epochs, epoch_losses[-1])
    model.eval()
    sparsity = measured_sparsity(model, include_head=pruning_schedule.include_head) if pruning_schedule else None
    return DistillResult(model=model, losses=tuple(losses), epoch_losses=tuple(epoch_losses), sparsity=sparsity)


def distill(
    student: nn.Module,
    teacher: nn.Module | None,
    data: TokenizedData,
    *,
    epochs: int,
    lr: float,
    temperature: float = 2.0,
    alpha: float = 0.5,
    hidden_mse_weight: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    teacher_logits: np.ndarray | None = None,
    pruning_schedule: PruningSchedule | None = None,
    progress: Progress | None = None,
) -> DistillResult:
    """Train `student` in place on alpha * KD(T) + (1 - alpha) * CE + hidden_mse_weight * hidden MSE.

    `teacher` may be None when `teacher_logits` are given and the hidden loss is off. The hidden-state MSE
    pairs student layer i with teacher layer `config.teacher_layer_indices[i]` (set by `make_student`, else
    evenly spaced); it needs equal hidden sizes, because a learned projection would add parameters that
    the deployed student does not have, so with different widths it is skipped with a warning.
    """
    if not 0.0 <= alpha <= 1.0 or temperature <= 0:
        raise ValueError(f"distill needs alpha in [0, 1] and temperature > 0, got alpha={alpha}, T={temperature}.")
    if teacher_logits is None:
        if teacher is None:
            raise ValueError("distill needs a teacher or precomputed teacher_logits.")
        teacher_logits = _predict(teacher, data, batch_size=max(batch_size, 64))
    soft = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)
    if soft.shape[0] != len(data):
        raise ValueError(f"teacher_logits has {soft.shape[0]} rows but the data has {len(data)} examples.")

    use_hidden = hidden_mse_weight > 0 and _hidden_loss_possible(student, teacher)
    layer_map = _layer_map(student, teacher) if use_hidden else ()
    if use_hidden:
        teacher.eval()

    def loss_fn(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, indices: list[int]):
        out = model(**inputs, output_hidden_states=use_hidden)
        loss = alpha * soft_target_loss(out.logits, soft[indices], temperature)
        if alpha < 1.0:
            loss = loss + (1.0 - alpha) * F.cross_entropy(out.logits, labels)
        if use_hidden:
            with torch.no_grad():
                teacher_states = teacher(**inputs, output_hidden_states=True).hidden_states
            loss = loss + hidden_mse_weight * hidden_state_loss(
                out.hidden_states, teacher_states, layer_map, inputs["attention_mask"]
            )
        return loss

    return _train(
        student, data, loss_fn, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        pruning_schedule=pruning_schedule, progress=progress,
    )


def _hidden_loss_possible(student: nn.Module, teacher: nn.Module | None) -> bool:
    if teacher is None:
        raise ValueError("hidden_mse_weight > 0 needs the teacher itself, not only its logits.")
    if shape_of(student).hidden != shape_of(teacher).hidden:
        log.warning("Hidden-state loss skipped: student hidden %d != teacher hidden %d.",
                    shape_of(student).hidden, shape_of(teacher).hidden)
        return False
    return True


def _layer_map(student: nn.Module, teacher: nn.Module) -> tuple[int, ...]:
    recorded = getattr(student.config, "teacher_layer_indices", None)
    if recorded is not None:
        return tuple(recorded)
    return even_layer_indices(shape_of(teacher).layers, shape_of(student).layers)


def finetune_teacher(
    model: nn.Module,
    data: TokenizedData,
    *,
    epochs: int,
    lr: float,
    seed: int,
    batch_size: int = 32,
    cache_dir: str | Path | None = None,
    cache_key: str | None = None,
    progress: Progress | None = None,
) -> nn.Module:
    """Fine-tune an encoder (typically with a fresh head) on hard labels; cached on disk when `cache_dir`.

    The cache entry is `cache_dir/<key>`, a safetensors `save_pretrained` directory; the key is `cache_key`
    or a hash of the starting weights, data and hyper-parameters. It is written to a temp directory and
    renamed into place (autotune.caches), so a crash or a concurrent writer never leaves a half-written model
    to be read, and an entry that fails its manifest or fails to load is trained again. A hit returns the
    cached model without training.
    """
    def train(staging: Path | None = None) -> nn.Module:
        def loss_fn(m: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, indices: list[int]):
            return F.cross_entropy(m(**inputs).logits, labels)

        trained = _train(model, data, loss_fn, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
                         pruning_schedule=None, progress=progress).model
        if staging is not None:
            trained.save_pretrained(staging, safe_serialization=True)
        return trained

    if cache_dir is None:
        return train()
    key = cache_key or hashlib.sha256(
        f"{state_fingerprint(model)}|{data.fingerprint()}|{epochs}|{lr}|{seed}|{batch_size}".encode()
    ).hexdigest()[:32]
    target = Path(cache_dir) / key
    teacher, hit = cached_dir_value(target, train,
                                    lambda path: type(model).from_pretrained(path, use_safetensors=True).eval())
    log.info("Fine-tuned teacher %s: %s", "cache hit" if hit else "cached", target)
    return teacher


def mean_kd_loss(
    model: nn.Module, data: TokenizedData, logits: np.ndarray, temperature: float = 2.0, batch_size: int = 64
) -> float:
    """The soft-target loss of `model` against `logits` over the whole data set, in eval mode."""
    predicted = torch.as_tensor(_predict(model, data, batch_size))
    return float(soft_target_loss(predicted, torch.as_tensor(np.asarray(logits), dtype=torch.float32), temperature))


__all__ = [
    "DistillResult", "TokenizedData", "collate", "distill", "finetune_teacher", "hidden_state_loss",
    "length_grouped_batches", "mean_kd_loss", "soft_target_loss", "teacher_logits", "tokenize",
]
