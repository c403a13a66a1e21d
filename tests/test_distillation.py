"""distill / teacher_logits / finetune_teacher: loss goes down, caches hit, seeds repeat, masks hold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autotune.compress import (
    PruningSchedule,
    TokenizedData,
    distill,
    finetune_teacher,
    make_student,
    mean_kd_loss,
    measured_sparsity,
    teacher_logits,
    teacher_states,
)
from autotune.compress.distillation import collate, length_grouped_batches, row_offsets, untied_token_table
from autotune.compress.pruning import prunable_linears
from conftest import VOCAB, synthetic_rows, tiny_config


def encode(rows: list[tuple[str, int]]) -> TokenizedData:
    """Word-level ids over the fixture vocabulary, [CLS] ... [SEP]: no tokenizer needed for these tests."""
    index = {word: i for i, word in enumerate(VOCAB)}
    ids = tuple((index["[CLS]"], *(index[w] for w in text.split()), index["[SEP]"]) for text, _ in rows)
    return TokenizedData(ids, tuple(label for _, label in rows), max_length=64)


def tiny(family: str = "bert", seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(family)).eval()


def count_forwards(model) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """On 2 shared cores torch's idle OpenMP workers spin; one thread trains these tiny models ~10x faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data() -> TokenizedData:
    return encode(synthetic_rows(160))


@pytest.fixture(scope="module")
def teacher_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("teacher-cache")


@pytest.fixture(scope="module")
def teacher(data: TokenizedData, teacher_cache: Path):
    """A teacher fine-tuned on the synthetic sentiment task, so its soft targets carry signal."""
    return finetune_teacher(tiny(), data, epochs=4, lr=6e-3, seed=0, batch_size=16, cache_dir=teacher_cache,
                            cache_key="tiny-bert-sentiment")


@pytest.fixture(scope="module")
def logits(teacher, data: TokenizedData) -> np.ndarray:
    return teacher_logits(teacher, data)


def test_batches_are_length_grouped_cover_everything_and_follow_the_seed() -> None:
    lengths = [3, 9, 4, 8, 3, 9, 4, 8, 5, 5]
    batches = length_grouped_batches(lengths, 2, seed=0)
    assert sorted(i for batch in batches for i in batch) == list(range(10))
    assert all(len({lengths[i] for i in batch}) == 1 for batch in batches)
    assert batches == length_grouped_batches(lengths, 2, seed=0)
    assert batches != length_grouped_batches(lengths, 2, seed=1)


def test_collate_pads_to_the_longest_in_the_batch_only() -> None:
    data = TokenizedData(((2, 5, 3), (2, 5, 6, 7, 3), (2, 3)), (0, 1, 0))
    inputs, labels = collate(data, [0, 2], pad_id=0)
    assert inputs["input_ids"].shape == (2, 3)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert labels.tolist() == [0, 0]


def test_finetuned_teacher_learns_the_task(logits: np.ndarray, data: TokenizedData) -> None:
    assert (logits.argmax(axis=1) == np.array(data.labels)).mean() > 0.9


def test_finetune_teacher_cache_returns_without_training(teacher, data: TokenizedData, teacher_cache: Path) -> None:
    steps: list[int] = []
    again = finetune_teacher(tiny(), data, epochs=4, lr=6e-3, seed=0, batch_size=16, cache_dir=teacher_cache,
                             cache_key="tiny-bert-sentiment", progress=lambda step, total, loss: steps.append(step))
    assert steps == []
    for (name, a), (_, b) in zip(teacher.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    assert not [p for p in teacher_cache.iterdir() if p.name.startswith(".")]


def test_distillation_lowers_the_kd_loss(teacher, logits: np.ndarray, data: TokenizedData) -> None:
    student = make_student(teacher, 1, 16, 2, 32)
    before = mean_kd_loss(student, data, logits)
    seen: list[tuple[int, int]] = []
    result = distill(student, teacher, data, epochs=4, lr=1e-2, alpha=1.0, batch_size=16, teacher_logits=logits,
                     progress=lambda step, total, loss: seen.append((step, total)))
    after = mean_kd_loss(result.model, data, logits)
    assert after < 0.1 * before
    assert seen[-1][0] == seen[-1][1] == len(result.losses) == 4 * 10
    assert len(result.epoch_losses) == 4


def test_teacher_logits_cache_hit_skips_the_teacher(teacher, data: TokenizedData, tmp_path: Path) -> None:
    calls = count_forwards(teacher)
    first = teacher_logits(teacher, data, cache_dir=tmp_path, teacher_fingerprint="tiny-v1")
    ran = calls[0]
    second = teacher_logits(teacher, data, cache_dir=tmp_path, teacher_fingerprint="tiny-v1")
    assert ran > 0 and calls[0] == ran
    np.testing.assert_array_equal(first, second)
    teacher_logits(teacher, encode(synthetic_rows(20, seed=5)), cache_dir=tmp_path, teacher_fingerprint="tiny-v1")
    assert calls[0] > ran
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npy", ".npy"]


def test_teacher_logits_are_in_data_order(teacher, data: TokenizedData) -> None:
    one_by_one = teacher_logits(teacher, data, batch_size=1)
    np.testing.assert_allclose(teacher_logits(teacher, data, batch_size=64), one_by_one, atol=1e-5)


def _distilled(teacher, logits, data, seed: int) -> dict[str, torch.Tensor]:
    student = make_student(teacher, 1, 16, 2, 32)
    result = distill(student, None, data, epochs=1, lr=3e-3, batch_size=32, seed=seed, teacher_logits=logits)
    return result.model.state_dict()


def test_same_seed_gives_identical_weights(teacher, logits: np.ndarray, data: TokenizedData) -> None:
    a, b, c = (_distilled(teacher, logits, data, seed) for seed in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_teacher_states_are_each_row_s_last_layer_cached_and_in_data_order(teacher, data: TokenizedData,
                                                                          tmp_path: Path) -> None:
    calls = count_forwards(teacher)
    states = teacher_states(teacher, data, tmp_path, "tiny-v1")
    ran = calls[0]
    np.testing.assert_array_equal(teacher_states(teacher, data, tmp_path, "tiny-v1"), states)
    assert ran > 0 and calls[0] == ran  # the second call read the cache
    assert states.dtype == np.float16 and states.shape == (sum(data.lengths), teacher.config.hidden_size)
    offsets = row_offsets(data)
    for i in (0, 7, len(data) - 1):  # each row alone, unpadded, as the packed array holds it
        inputs, _ = collate(data, [i], 0)
        with torch.no_grad():
            alone = teacher(**inputs, output_hidden_states=True).hidden_states[-1][0].numpy()
        np.testing.assert_allclose(states[offsets[i]:offsets[i + 1]].astype(np.float32), alone, atol=2e-2)


@pytest.mark.parametrize("hidden", [32, 16])  # the teacher's width, and a narrower student through the projection
def test_state_transfer_adds_to_the_objective_and_pulls_the_student_s_states_to_the_teacher_s(
        teacher, logits: np.ndarray, data: TokenizedData, tmp_path: Path, hidden: int) -> None:
    states = teacher_states(teacher, data, tmp_path, "tiny-v1")

    def train(weight: float, epochs: int = 1):
        return distill(make_student(teacher, 1, hidden, 4 if hidden == 32 else 2, 32), None, data, epochs=epochs,
                       lr=3e-3, batch_size=80, teacher_logits=logits, teacher_last_states=states, state_weight=weight)

    assert train(1.0).losses[0] > train(0.0).losses[0]
    result = train(1.0, epochs=4)
    assert result.losses[-1] < result.losses[0]


def test_state_transfer_bad_inputs_are_one_sentence(teacher, logits: np.ndarray, data: TokenizedData) -> None:
    student = make_student(teacher, 1, 32, 4, 32)
    with pytest.raises(ValueError, match="needs the teacher or its teacher_last_states"):
        distill(student, None, data, epochs=1, lr=1e-3, teacher_logits=logits, state_weight=1.0)
    with pytest.raises(ValueError, match="token rows but the data has"):
        distill(student, None, data, epochs=1, lr=1e-3, teacher_logits=logits, state_weight=1.0,
                teacher_last_states=np.zeros((3, 32), np.float16))
    with pytest.raises(ValueError, match="state_weight >= 0"):
        distill(student, None, data, epochs=1, lr=1e-3, teacher_logits=logits, state_weight=-1.0)


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [(PruningSchedule(0.6, steps=3, end=0.5), 0.6), (PruningSchedule(None, pattern="2:4"), 0.5)],
)
def test_pruned_weights_stay_zero_through_distillation(
    teacher, logits: np.ndarray, data: TokenizedData, schedule: PruningSchedule, expected: float
) -> None:
    student = make_student(teacher, 2, 32, 4, 64)
    result = distill(student, teacher, data, epochs=2, lr=3e-3, batch_size=32, teacher_logits=logits,
                     pruning_schedule=schedule)
    total = sum(m.weight.numel() for m in prunable_linears(result.model).values())
    assert abs(result.sparsity - expected) <= 1 / total
    assert measured_sparsity(result.model) == result.sparsity
    if schedule.pattern == "2:4":
        for linear in prunable_linears(result.model).values():
            assert bool(((linear.weight.reshape(linear.weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all())


def test_the_token_table_learns_only_the_rows_the_data_uses_and_is_dense_again_after(
        teacher, logits: np.ndarray, data: TokenizedData) -> None:
    """Lazy Adam: rows of tokens the training data never holds keep their weights exactly, the others move, and the
    table's gradient is dense again once training ends (what export and later training expect)."""
    student = make_student(teacher, 1, 16, 2, 32)
    before = student.get_input_embeddings().weight.detach().clone()
    distill(student, None, data, epochs=1, lr=3e-3, batch_size=32, seed=0, teacher_logits=logits)
    after = student.get_input_embeddings().weight.detach()
    used = sorted({token for ids in data.input_ids for token in ids})
    unused = sorted(set(range(before.shape[0])) - set(used))
    assert unused, "the fixture's data should leave some tokens out"
    assert torch.equal(after[unused], before[unused])
    assert not torch.allclose(after[used], before[used])
    assert student.get_input_embeddings().sparse is False


def test_a_tied_token_table_trains_dense(tiny_llama_dir: Path) -> None:
    """A table the output layer shares gets a dense gradient from it, so only an untied one is trained lazily."""
    from transformers import AutoModelForCausalLM

    classifier = tiny()
    assert untied_token_table(classifier) is classifier.get_input_embeddings()
    assert untied_token_table(AutoModelForCausalLM.from_pretrained(tiny_llama_dir)) is None


def test_bad_arguments_are_named(data: TokenizedData) -> None:
    with pytest.raises(ValueError, match="needs a teacher or precomputed teacher_logits"):
        distill(tiny(), None, data, epochs=1, lr=1e-3)
    with pytest.raises(ValueError, match="sequences but"):
        TokenizedData(((2, 3),), (0, 1))
