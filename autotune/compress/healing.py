"""Healing: a short distillation that lets a compressed causal LM (blocks dropped, FFN narrowed, pruned) recover its
teacher's next-token distributions within a bounded number of training tokens.

The teacher runs once: `teacher_targets` keeps only its top-k next-token ids and log-probabilities per position
(k=32 of a ~49k vocabulary is what fits a cache on disk), and callers store them with `TeacherTargets.save`.
`heal` then trains the student with AdamW on `topk_kd_loss`, which needs no teacher forward at all.

The student is trained IN PLACE, like `distill` for encoders: `heal` returns the same object, trained, and never
copies a model that may be large; a caller that needs the untrained student keeps its own copy first.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from autotune.compress.decoder import check_windows, model_device, run_windows

log = logging.getLogger(__name__)

StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TeacherTargets:
    """The teacher's top-k next-token distribution at every position of every calibration window.

    `indices` [n, length, k] int64 are token ids, `logprobs` [n, length, k] float32 their log-probabilities
    normalised over the FULL vocabulary (so their probabilities sum to less than 1: the tail beyond k is dropped).
    """

    indices: torch.Tensor
    logprobs: torch.Tensor

    def __post_init__(self) -> None:
        if self.indices.dim() != 3 or self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"TeacherTargets needs indices and logprobs of one shape [n, length, k]; got "
                f"{tuple(self.indices.shape)} and {tuple(self.logprobs.shape)}."
            )
        object.__setattr__(self, "indices", self.indices.long())
        object.__setattr__(self, "logprobs", self.logprobs.float())

    @property
    def k(self) -> int:
        """How many of the teacher's most likely tokens are kept per position."""
        return int(self.indices.shape[-1])

    def save(self, path: str | Path) -> Path:
        """Write to `path` (torch format, e.g. `targets.pt`) through a temp file and `os.replace`, so a crash or a
        concurrent reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                torch.save({"indices": self.indices, "logprobs": self.logprobs}, handle)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    @classmethod
    def load(cls, path: str | Path) -> TeacherTargets:
        """Read targets written by `save` (tensors only: `weights_only=True` runs no pickled code)."""
        saved = torch.load(Path(path), map_location="cpu", weights_only=True)
        return cls(indices=saved["indices"], logprobs=saved["logprobs"])


def teacher_targets(teacher: nn.Module, windows: torch.Tensor, k: int = 32, batch_size: int = 4) -> TeacherTargets:
    """The teacher's top-k next-token ids and full-vocabulary log-probabilities for every window position."""
    windows = check_windows(windows)
    vocab = int(teacher.config.vocab_size)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= vocab:
        raise ValueError(f"k must be an integer in [1, {vocab}] (the vocabulary size); got {k!r}.")
    indices, logprobs = [], []
    for out in run_windows(teacher, windows, batch_size):
        top = torch.topk(F.log_softmax(out.logits.float(), dim=-1), k, dim=-1)
        indices.append(top.indices.cpu())
        logprobs.append(top.values.cpu())
    return TeacherTargets(indices=torch.cat(indices), logprobs=torch.cat(logprobs))


def topk_kd_loss(
    student_logits: torch.Tensor,
    targets_indices: torch.Tensor,
    targets_logprobs: torch.Tensor,
    *,
    input_ids: torch.Tensor | None = None,
    hard_weight: float = 0.0,
) -> torch.Tensor:
    """-sum_k p_teacher(k) * log_softmax(student)[k], averaged over positions, plus `hard_weight` times the
    next-token cross-entropy on `input_ids` when that weight is positive.

    This is the cross-entropy against the teacher restricted to its top-k tokens (the tail beyond k is dropped,
    not renormalised), so its gradient equals the KL divergence's on that support. `hard_weight` defaults to 0:
    the teacher's distribution already carries the next-token signal with far less variance than one sampled
    label, and healing aims to restore the teacher's function, not to fit the calibration text.
    """
    if hard_weight < 0:
        raise ValueError(f"hard_weight must be >= 0; got {hard_weight!r}.")
    log_student = F.log_softmax(student_logits.float(), dim=-1)
    picked = log_student.gather(-1, targets_indices.long())
    loss = -(targets_logprobs.float().exp() * picked).sum(-1).mean()
    if hard_weight > 0:
        if input_ids is None:
            raise ValueError("hard_weight > 0 needs input_ids for the next-token labels.")
        hard = F.cross_entropy(log_student[:, :-1].reshape(-1, log_student.shape[-1]), input_ids[:, 1:].reshape(-1))
        loss = loss + hard_weight * hard
    return loss


@dataclass(frozen=True)
class HealResult:
    """The healed model (the student itself, trained in place), steps taken, training tokens seen, and the loss of
    the first and last step."""

    model: nn.Module
    steps: int
    tokens: int
    first_loss: float
    last_loss: float


def check_heal_request(
    windows: torch.Tensor, targets: TeacherTargets, tokens: int, lr: float, batch_size: int
) -> torch.Tensor:
    """A ValueError naming the first bad argument of `heal`; the windows as a LongTensor otherwise."""
    windows = check_windows(windows)
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise ValueError(f"tokens must be an integer >= 1 (the training budget); got {tokens!r}.")
    if not lr > 0:
        raise ValueError(f"lr must be > 0; got {lr!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1; got {batch_size!r}.")
    if tuple(targets.indices.shape[:2]) != tuple(windows.shape):
        raise ValueError(
            f"targets cover windows of shape {tuple(targets.indices.shape[:2])} but windows has shape "
            f"{tuple(windows.shape)}; compute the targets on these windows."
        )
    return windows


def batch_order(windows: int, steps: int, batch_size: int, seed: int) -> torch.Tensor:
    """[steps, batch_size] window indices: seeded random permutations laid end to end, cycling through the windows
    as often as the budget needs."""
    generator = torch.Generator().manual_seed(seed)
    needed = steps * batch_size
    cycles = [torch.randperm(windows, generator=generator) for _ in range(math.ceil(needed / windows))]
    return torch.cat(cycles)[:needed].view(steps, batch_size)


def heal(
    student: nn.Module,
    windows: torch.Tensor,
    targets: TeacherTargets,
    *,
    tokens: int,
    lr: float = 1e-4,
    batch_size: int = 4,
    seed: int = 0,
    hard_weight: float = 0.0,
    on_step: StepCallback | None = None,
) -> HealResult:
    """Train `student` in place toward the teacher's top-k targets for ceil(tokens / (batch_size * length)) AdamW
    steps (constant lr), in a seeded order over the windows; it is left in eval mode."""
    windows = check_heal_request(windows, targets, tokens, lr, batch_size)
    steps = math.ceil(tokens / (batch_size * windows.shape[1]))
    order = batch_order(windows.shape[0], steps, batch_size, seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr)
    device = model_device(student)
    losses: list[float] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        student.train()
        try:
            for step, batch in enumerate(order, start=1):
                ids = windows[batch].to(device)
                logits = student(input_ids=ids, use_cache=False).logits
                loss = topk_kd_loss(logits, targets.indices[batch].to(device), targets.logprobs[batch].to(device),
                                    input_ids=ids, hard_weight=hard_weight)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                if on_step is not None:
                    on_step(step, steps, losses[-1])
        finally:
            student.eval()
    log.info("Healed %d steps (%d tokens): loss %.4f -> %.4f", steps, order.numel() * windows.shape[1],
             losses[0], losses[-1])
    return HealResult(model=student, steps=steps, tokens=order.numel() * windows.shape[1],
                      first_loss=losses[0], last_loss=losses[-1])


__all__ = ["HealResult", "TeacherTargets", "heal", "teacher_targets", "topk_kd_loss"]
