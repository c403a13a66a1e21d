"""prune: measured sparsity equals the request, N:M groups hold, the model stays plain, bad input is named."""

from __future__ import annotations

import pytest
import torch

from autotune.compress import PruningSchedule, measured_sparsity, prune, sparsity_schedule
from autotune.compress.pruning import prunable_linears
from conftest import tiny_config


def model(family: str = "bert", seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(family)).eval()


def zeros(weight: torch.Tensor) -> int:
    return int((weight == 0).sum())


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
@pytest.mark.parametrize("amount", [0.0, 0.3, 0.77])
def test_global_unstructured_hits_the_requested_count(family: str, amount: float) -> None:
    pruned = model(family)
    result = prune(pruned, amount)
    weights = [m.weight for m in prunable_linears(pruned).values()]
    total = sum(w.numel() for w in weights)
    assert abs(sum(zeros(w) for w in weights) - amount * total) <= 1
    assert result.achieved_sparsity == pytest.approx(measured_sparsity(pruned))
    assert abs(result.achieved_sparsity - amount) <= 1 / total


def test_per_layer_scope_prunes_every_linear_to_the_amount() -> None:
    pruned = model()
    prune(pruned, 0.4, scope="layer")
    for name, linear in prunable_linears(pruned).items():
        assert abs(zeros(linear.weight) - 0.4 * linear.weight.numel()) <= 1, name


@torch.no_grad()
def test_global_scope_takes_more_from_a_low_magnitude_layer() -> None:
    pruned = model()
    quiet = pruned.bert.encoder.layer[1].intermediate.dense
    quiet.weight *= 0.01
    prune(pruned, 0.2)
    assert zeros(quiet.weight) == quiet.weight.numel()


def test_embeddings_and_head_stay_dense_and_model_is_plain() -> None:
    pruned, dense = model(), model()
    prune(pruned, 0.9)
    for path in ("classifier", "bert.pooler.dense", "bert.embeddings.word_embeddings"):
        assert torch.equal(pruned.get_submodule(path).weight, dense.get_submodule(path).weight), path
    names = [name for name, _ in pruned.named_parameters()] + [name for name, _ in pruned.named_buffers()]
    assert not any(name.endswith(("weight_orig", "weight_mask")) for name in names)
    assert all(not linear._forward_pre_hooks for linear in prunable_linears(pruned).values())


def test_include_head_prunes_the_classifier_too() -> None:
    pruned = model()
    result = prune(pruned, 0.5, scope="layer", include_head=True)
    assert "classifier" in result.masks and zeros(pruned.classifier.weight) == pruned.classifier.weight.numel() // 2


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8"])
def test_n_m_pattern_holds_in_every_group(pattern: str) -> None:
    n, m = map(int, pattern.split(":"))
    pruned = model()
    result = prune(pruned, None, pattern=pattern)
    for linear in prunable_linears(pruned).values():
        groups = linear.weight.reshape(linear.weight.shape[0], -1, m)
        assert bool(((groups != 0).sum(dim=-1) <= n).all())
    assert result.achieved_sparsity == pytest.approx(1 - n / m)


def test_n_m_accepts_its_own_amount_and_rejects_another() -> None:
    assert prune(model(), 0.5, pattern="2:4").achieved_sparsity == pytest.approx(0.5)
    with pytest.raises(ValueError, match="fixes sparsity at 0.5"):
        prune(model(), 0.3, pattern="2:4")


@pytest.mark.parametrize("amount", [1.0, -0.1, 1.5])
def test_amount_outside_unit_interval_is_rejected(amount: float) -> None:
    with pytest.raises(ValueError, match=r"amount must be a fraction in \[0, 1\)") as error:
        prune(model(), amount)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pattern", ["block", "4:2", "2-4", "0:4"])
def test_unknown_pattern_lists_the_accepted_ones(pattern: str) -> None:
    with pytest.raises(ValueError, match="accepted: 'unstructured' or 'N:M'"):
        prune(model(), 0.5, pattern=pattern)


def test_unknown_scope_is_rejected() -> None:
    with pytest.raises(ValueError, match="'global' or 'layer'"):
        prune(model(), 0.5, scope="row")


def test_cubic_schedule_rises_fast_then_flattens_to_the_final_amount() -> None:
    amounts = sparsity_schedule(0.8, 4)
    assert amounts[-1] == pytest.approx(0.8)
    assert list(amounts) == sorted(amounts)
    steps = [b - a for a, b in zip((0.0, *amounts), amounts)]
    assert steps == sorted(steps, reverse=True)
    assert sparsity_schedule(0.8, 4, kind="linear") == pytest.approx((0.2, 0.4, 0.6, 0.8))


def test_schedule_events_fall_between_start_and_end() -> None:
    events = PruningSchedule(0.6, steps=3, start=0.2, end=0.6).events(101)
    assert list(events) == [20, 40, 60]
    assert events[60] == pytest.approx(0.6)
    assert PruningSchedule(None, pattern="2:4", start=0.5).events(11) == {5: None}


def test_schedule_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="start <= end"):
        PruningSchedule(0.5, start=0.8, end=0.2)
    with pytest.raises(ValueError, match="fraction in"):
        PruningSchedule(1.2)
