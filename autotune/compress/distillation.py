"""Knowledge distillation (soft targets + hard labels), teacher fine-tuning, and their on-disk caches.

Training is the bottleneck of a trial on a small CPU box, so the loop is built to waste nothing:
- Batches are padded per batch and grouped by length: examples are sorted by token count, cut into
  batches, and the batch order is shuffled with the seed. Padding every batch to the longest possible
  sequence would spend most FLOPs on pad tokens.
- Teacher logits, and the teacher's last-layer states when the state transfer is on, are computed once per
  (teacher, data) and cached to .npy files (cache entries of autotune.caches: a header line, then the array);
  a trial never runs the teacher.
- A fine-tuned teacher is cached as a safetensors directory, so a study fine-tunes it once.

Everything is seeded: the same seed on the CPU gives bit-identical weights. The global RNG state of the
caller is left as it was (`torch.random.fork_rng`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from autotune.caches import cached_dir_value, cached_file
from autotune.compress.pruning import PruningSchedule, apply_masks, compute_masks, measured_sparsity
from autotune.models import shape_of, state_fingerprint

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float], None]

#: How `_train` optimises, part of every trained model's cache key: a model trained another way is trained again.
OPTIMIZER = "AdamW; lazy Adam (SparseAdam) for an untied token table"


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
    return _cached_teacher_array("logits", Path(cache_dir), teacher_fingerprint or state_fingerprint(teacher), data,
                                 lambda: _predict(teacher, data, batch_size), lambda array: array.shape[0] == len(data))


def _cached_teacher_array(kind: str, cache_dir: Path, teacher_fingerprint: str, data: TokenizedData,
                          compute: Callable[[], np.ndarray], valid: Callable[[np.ndarray], bool]) -> np.ndarray:
    """An array the teacher computes once per (teacher, data), an .npy entry of `cache_dir` keyed by both."""
    key = hashlib.sha256(f"{teacher_fingerprint}|{data.fingerprint()}".encode()).hexdigest()[:32]
    path = cache_dir / f"teacher-{kind}-{key}.npy"
    array, hit = cached_file(path, compute, _npy_bytes, _npy_array, valid=valid)
    log.info("Teacher %s %s: %s", kind, "cache hit" if hit else "cached", path)
    return array


def soft_target_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's KD term: KL(teacher_T || student_T) * T^2, batch mean.

    The teacher's softened distribution is the target (the usual direction); T^2 keeps the gradient scale
    independent of T, so alpha means the same thing at every temperature.
    """
    log_student = F.log_softmax(student_logits / temperature, dim=-1)
    target = F.softmax(teacher_logits / temperature, dim=-1)
    return F.kl_div(log_student, target, reduction="batchmean") * temperature**2


def row_offsets(data: TokenizedData) -> np.ndarray:
    """Where each example's tokens start in a packed [tokens, hidden] array (one more entry: the total)."""
    return np.concatenate([[0], np.cumsum(data.lengths)]).astype(np.int64)


@torch.no_grad()
def _packed_states(model: nn.Module, data: TokenizedData, batch_size: int) -> np.ndarray:
    """The model's last-layer hidden state of every real token, row after row, float16 [tokens, hidden]."""
    was_training = model.training
    model.eval()
    offsets, states = row_offsets(data), None
    for indices in length_grouped_batches(data.lengths, batch_size, seed=None):
        inputs, _ = collate(data, indices, _pad_id(model))
        hidden = model(**inputs, output_hidden_states=True).hidden_states[-1].float().numpy()
        states = np.zeros((offsets[-1], hidden.shape[-1]), np.float16) if states is None else states
        for row, i in enumerate(indices):
            states[offsets[i]:offsets[i + 1]] = hidden[row, :offsets[i + 1] - offsets[i]]
    model.train(was_training)
    return states


def teacher_states(teacher: nn.Module, data: TokenizedData, cache_dir: str | Path, teacher_fingerprint: str,
                   batch_size: int = 64) -> np.ndarray:
    """The teacher's last-layer states of the training data (`_packed_states`), cached like its logits: one
    teacher pass per (teacher, data), and no teacher in any trial (about 2 bytes x hidden per token)."""
    return _cached_teacher_array("states", Path(cache_dir), teacher_fingerprint, data,
                                 lambda: _packed_states(teacher, data, batch_size),
                                 lambda array: array.ndim == 2 and array.shape[0] == sum(data.lengths))


def batch_states(states: np.ndarray, offsets: np.ndarray, indices: Sequence[int], width: int) -> torch.Tensor:
    """The packed states of `indices`, padded with zeros to `width` tokens: [batch, width, hidden] float32."""
    out = torch.zeros((len(indices), width, states.shape[1]), dtype=torch.float32)
    for row, i in enumerate(indices):
        rows = states[offsets[i]:offsets[i + 1]]
        out[row, :len(rows)] = torch.from_numpy(rows.astype(np.float32))
    return out


def state_transfer_loss(student_last: torch.Tensor, teacher_last: torch.Tensor, projection: nn.Module,
                        mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error between the student's projected last-layer states and the teacher's, over real tokens
    (TinyBERT's hidden-state transfer at the last layer; the projection exists in training only)."""
    weight = mask.unsqueeze(-1).float()
    diff = (projection(student_last) - teacher_last) ** 2 * weight
    return diff.sum() / (weight.sum() * diff.shape[-1]).clamp_min(1.0)


def state_projection(student_hidden: int, teacher_hidden: int) -> nn.Linear:
    """Student width -> teacher width, no bias; the identity when they match, so training starts from the copied
    layers' own alignment."""
    projection = nn.Linear(student_hidden, teacher_hidden, bias=False)
    if student_hidden == teacher_hidden:
        with torch.no_grad():
            projection.weight.copy_(torch.eye(teacher_hidden))
    return projection


@dataclass(frozen=True)
class DistillResult:
    """The trained model (same object, trained in place), loss per step, mean loss per epoch, final sparsity."""

    model: nn.Module
    losses: tuple[float, ...]
    epoch_losses: tuple[float, ...]
    sparsity: float | None = None


LossFn = Callable[[nn.Module, dict[str, torch.Tensor], torch.Tensor, list[int]], torch.Tensor]


def untied_token_table(model: nn.Module) -> nn.Embedding | None:
    """The model's token embedding table when no output layer shares its weight (an encoder classifier's), else
    None: a tied table gets a dense gradient from the output layer anyway."""
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(table, nn.Embedding):
        return None
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return None if output is not None and output.weight is table.weight else table


@contextlib.contextmanager
def row_gradients(model: nn.Module) -> Iterator[None]:
    """While training, a trainable untied token table's gradient holds only the rows a batch touches (what lazy Adam
    updates); dense again afterwards, so the model exports and trains elsewhere as before."""
    table = untied_token_table(model)
    if table is None or not table.weight.requires_grad:
        yield
        return
    table.sparse = True
    try:
        yield
    finally:
        table.sparse = False


def training_optimizers(model: nn.Module, extra_parameters: Sequence[nn.Parameter],
                        lr: float) -> list[torch.optim.Optimizer]:
    """AdamW for the dense weights, lazy Adam (`SparseAdam`) for a token table with row gradients (`row_gradients`).

    A dense AdamW step over a 30k-token table, and its dense gradient, cost more than two slim BERT layers' forward
    and backward (bench/training_step.py); a batch touches a few hundred rows, and lazy Adam updates only those (rows not
    in a batch keep their moments and weights, without AdamW's 0.01 weight decay, which moved them by 0.2% at most).
    """
    table = untied_token_table(model)
    trainable = [p for p in (*model.parameters(), *extra_parameters) if p.requires_grad]
    if table is None or not table.sparse:
        return [torch.optim.AdamW(trainable, lr=lr)]
    dense = [p for p in trainable if p is not table.weight]
    return [torch.optim.AdamW(dense, lr=lr), torch.optim.SparseAdam([table.weight], lr=lr)]


def _pruned(model: nn.Module, schedule: PruningSchedule, sparsity: float,
            previous: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gradual pruning's next event: masks at `sparsity` (growing from `previous`), applied to the model."""
    masks = compute_masks(model, sparsity, pattern=schedule.pattern, scope=schedule.scope,
                          include_head=schedule.include_head, previous=previous or None)
    apply_masks(model, masks)
    log.info("Pruned to %.3f sparsity", measured_sparsity(model, include_head=schedule.include_head))
    return masks


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
    extra_parameters: Sequence[nn.Parameter] = (),
) -> DistillResult:
    """The one training loop: `training_optimizers`, linear decay to 0, length-grouped batches, optional gradual
    pruning; `extra_parameters` (a loss's own, such as a projection) train alongside the model."""
    if epochs < 1 or lr <= 0:
        raise ValueError(f"Training needs epochs >= 1 and lr > 0, got epochs={epochs}, lr={lr}.")
    with torch.random.fork_rng(devices=[]), row_gradients(model):
        torch.manual_seed(seed)
        plan = [length_grouped_batches(data.lengths, batch_size, seed + epoch) for epoch in range(epochs)]
        total = sum(len(batches) for batches in plan)
        optimizers = training_optimizers(model, extra_parameters, lr)
        schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 - step / total) for o in optimizers]
        events = pruning_schedule.events(total) if pruning_schedule else {}
        masks: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        epoch_losses: list[float] = []
        model.train()
        model.zero_grad(set_to_none=True)
        step = 0
        for epoch, batches in enumerate(plan):
            running = 0.0
            for indices in batches:
                if step in events:
                    masks = _pruned(model, pruning_schedule, events[step], masks)
                inputs, labels = collate(data, indices, _pad_id(model))
                loss = loss_fn(model, inputs, labels, indices)
                loss.backward()
                for optimizer, scheduler in zip(optimizers, schedulers):
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
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
    state_weight: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    teacher_logits: np.ndarray | None = None,
    teacher_last_states: np.ndarray | None = None,
    pruning_schedule: PruningSchedule | None = None,
    progress: Progress | None = None,
) -> DistillResult:
    """Train `student` in place on alpha * KD(T) + (1 - alpha) * CE + state_weight * last-layer state transfer.

    `teacher` may be None when `teacher_logits` (and, with `state_weight`, `teacher_last_states` from
    `teacher_states`) are given. The state transfer maps the student's last-layer states onto the teacher's
    through a projection trained alongside and dropped afterwards, so students of any width learn the teacher's
    representation, not only its output distribution.
    """
    if not 0.0 <= alpha <= 1.0 or temperature <= 0 or state_weight < 0:
        raise ValueError(f"distill needs alpha in [0, 1], temperature > 0 and state_weight >= 0, got alpha={alpha}, "
                         f"T={temperature}, state_weight={state_weight}.")
    if teacher_logits is None:
        if teacher is None:
            raise ValueError("distill needs a teacher or precomputed teacher_logits.")
        teacher_logits = _predict(teacher, data, batch_size=max(batch_size, 64))
    soft = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32)
    if soft.shape[0] != len(data):
        raise ValueError(f"teacher_logits has {soft.shape[0]} rows but the data has {len(data)} examples.")
    offsets = row_offsets(data)
    projection, teacher_last_states = (None, None) if state_weight == 0 else _state_transfer(
        student, teacher, data, teacher_last_states, seed, batch_size)

    def loss_fn(model: nn.Module, inputs: dict[str, torch.Tensor], labels: torch.Tensor, indices: list[int]):
        out = model(**inputs, output_hidden_states=projection is not None)
        loss = alpha * soft_target_loss(out.logits, soft[indices], temperature)
        if alpha < 1.0:
            loss = loss + (1.0 - alpha) * F.cross_entropy(out.logits, labels)
        if projection is not None:
            mask = inputs["attention_mask"]
            target = batch_states(teacher_last_states, offsets, indices, mask.shape[1])
            loss = loss + state_weight * state_transfer_loss(out.hidden_states[-1], target, projection, mask)
        return loss

    return _train(
        student, data, loss_fn, epochs=epochs, lr=lr, batch_size=batch_size, seed=seed,
        pruning_schedule=pruning_schedule, progress=progress,
        extra_parameters=() if projection is None else tuple(projection.parameters()),
    )


def _state_transfer(student: nn.Module, teacher: nn.Module | None, data: TokenizedData, states: np.ndarray | None,
                    seed: int, batch_size: int) -> tuple[nn.Linear, np.ndarray]:
    """The state transfer's seeded projection and the teacher's packed states (computed when not given), checked
    against the data."""
    if states is None:
        if teacher is None:
            raise ValueError("state_weight > 0 needs the teacher or its teacher_last_states.")
        states = _packed_states(teacher, data, batch_size=max(batch_size, 64))
    if states.shape[0] != sum(data.lengths):
        raise ValueError(f"teacher_last_states has {states.shape[0]} token rows but the data has {sum(data.lengths)} "
                         "tokens.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return state_projection(shape_of(student).hidden, states.shape[1]), states


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
        f"{state_fingerprint(model)}|{data.fingerprint()}|{epochs}|{lr}|{seed}|{batch_size}|{OPTIMIZER}".encode()
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
    "OPTIMIZER", "DistillResult", "TokenizedData", "collate", "distill", "finetune_teacher", "state_transfer_loss",
    "teacher_states",
    "length_grouped_batches", "mean_kd_loss", "soft_target_loss", "teacher_logits", "tokenize",
]
