"""make_student: shapes, exact reproduction at the teacher's shape, importance-based slicing, validation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autotune.compress import even_layer_indices, make_student
from autotune.models import attention_layout, encoder_layers, family_of, load_saved, self_attention, shape_of
from conftest import tiny_config

FAMILIES = ["bert", "roberta", "distilbert"]


def teacher(family: str, layers: int = 2, seed: int = 0):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    config = tiny_config(family)
    setattr(config, "n_layers" if family == "distilbert" else "num_hidden_layers", layers)
    return AutoModelForSequenceClassification.from_config(config).eval()


def batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 33, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ids[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    return model(**inputs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_shaped_student_reproduces_teacher_logits(family: str) -> None:
    model = teacher(family)
    student = make_student(model, 2, 32, 4, 64)
    torch.testing.assert_close(logits(student, batch()), logits(model, batch()), atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_student_has_requested_shape_and_round_trips(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForSequenceClassification

    student = make_student(teacher(family), 1, 16, 2, 24)
    shape = shape_of(student)
    assert (shape.layers, shape.hidden, shape.heads, shape.ffn) == (1, 16, 2, 24)
    layer = encoder_layers(student)[0]
    f = family_of(student)
    assert layer.get_submodule(f.query).weight.shape == (16, 16)
    assert layer.get_submodule(f.ffn_in).weight.shape == (24, 16)
    assert student.get_submodule(f.head_out).weight.shape == (2, 16)
    student.save_pretrained(tmp_path, safe_serialization=True)
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path, use_safetensors=True).eval()
    assert type(loaded) is type(student)
    torch.testing.assert_close(logits(loaded, batch()), logits(student, batch()), atol=0, rtol=0)


def test_distilbert_config_uses_its_own_names() -> None:
    config = make_student(teacher("distilbert"), 1, 16, 2, 24).config
    assert (config.n_layers, config.dim, config.n_heads, config.hidden_dim) == (1, 16, 2, 24)


def test_layers_are_evenly_spaced_with_first_and_last_kept() -> None:
    assert even_layer_indices(6, 3) == (0, 2, 5)
    assert even_layer_indices(12, 6) == (0, 2, 4, 6, 8, 11)
    assert even_layer_indices(6, 6) == tuple(range(6))
    assert even_layer_indices(4, 1) == (0,)


def test_layer_indices_override_selects_those_teacher_layers() -> None:
    model = teacher("bert", layers=4)
    student = make_student(model, 2, 32, 4, 64, layer_indices=[1, 3])
    assert student.config.teacher_layer_indices == [1, 3]
    for kept, source in zip(encoder_layers(student), [1, 3]):
        torch.testing.assert_close(kept.output.dense.weight, encoder_layers(model)[source].output.dense.weight)


@torch.no_grad()
def test_slicing_keeps_the_most_important_units() -> None:
    """One hidden dim, one head and one FFN neuron are made dominant; each must survive heavy slicing."""
    model = teacher("bert")
    base, layer = model.bert, model.bert.encoder.layer[0]
    important_dim, important_head, important_neuron, head_dim = 29, 3, 50, 8
    base.embeddings.word_embeddings.weight[:, important_dim] *= 50
    base.embeddings.LayerNorm.bias[important_dim] = 7.0
    heads = slice(important_head * head_dim, (important_head + 1) * head_dim)
    for linear in (layer.attention.self.query, layer.attention.self.key, layer.attention.self.value):
        linear.weight[heads] *= 20
    layer.attention.self.value.bias[heads] = 9.0
    layer.attention.output.dense.weight[:, heads] *= 20
    layer.intermediate.dense.weight[important_neuron] *= 20
    layer.output.dense.weight[:, important_neuron] *= 20
    layer.intermediate.dense.bias[important_neuron] = 11.0

    student = make_student(model, 1, 16, 2, 8)
    kept = student.bert.encoder.layer[0]
    assert 7.0 in student.bert.embeddings.LayerNorm.bias.tolist()
    # head_dim stays 8, so the important teacher head is copied whole into one student head
    assert kept.attention.self.value.bias.tolist().count(9.0) == head_dim
    assert 11.0 in kept.intermediate.dense.bias.tolist()


def _dropped_hidden_dims(model, student) -> set[int]:
    teacher_columns = model.bert.embeddings.word_embeddings.weight.T
    student_columns = student.bert.embeddings.word_embeddings.weight.T
    return {i for i, column in enumerate(teacher_columns) if not any(torch.equal(column, s) for s in student_columns)}


@torch.no_grad()
def test_calibration_batch_ranks_hidden_dims_by_activation() -> None:
    """A dim with big weights but zero activations (LayerNorm gain 0) goes with calibration, stays without."""
    model = teacher("bert")
    dead = 4
    model.bert.embeddings.word_embeddings.weight[:, dead] *= 100
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.weight[dead], module.bias[dead] = 0.0, 0.0
    assert _dropped_hidden_dims(model, make_student(model, 1, 31, 1, 64, calibration=batch())) == {dead}
    assert dead not in _dropped_hidden_dims(model, make_student(model, 1, 31, 1, 64))


@pytest.mark.parametrize(
    ("shape", "fragment"),
    [
        ((2, 30, 4, 64), "not a multiple of heads"),
        ((2, 32, 8, 64), "heads=8 exceeds"),
        ((3, 32, 4, 64), "layers=3 exceeds"),
        ((2, 64, 4, 64), "hidden=64 exceeds"),
        ((2, 32, 4, 128), "ffn=128 exceeds"),
        ((0, 32, 4, 64), "layers must be an integer >= 1"),
        ((2, 32, 4, 0), "ffn must be an integer >= 1"),
    ],
)
def test_invalid_shapes_raise_one_sentence(shape: tuple[int, int, int, int], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as error:
        make_student(teacher("bert"), *shape)
    assert str(error.value).endswith(".") and "\n" not in str(error.value)


@torch.no_grad()
def _silence_heads(model, heads: tuple[int, ...], head_dim: int = 8):
    """Zero the queries, keys and values of `heads` in every layer: they attend uniformly to nothing and write nothing."""
    f = family_of(model)
    for layer in encoder_layers(model, f):
        for path in (f.query, f.key, f.value):
            linear = layer.get_submodule(path)
            for h in heads:
                linear.weight[h * head_dim:(h + 1) * head_dim] = 0
                linear.bias[h * head_dim:(h + 1) * head_dim] = 0
    return model


@pytest.mark.parametrize("family", FAMILIES)
def test_pruned_heads_keep_the_teachers_useful_heads_whole_and_round_trip(family: str, tmp_path: Path) -> None:
    model = _silence_heads(teacher(family), heads=(1, 3))
    student = make_student(model, 2, 32, 2, 64, head_dim=8)  # 2 of 4 heads at the teacher's width of 8
    assert attention_layout(student) == (2, 16) and attention_layout(model) == (4, 32)
    f = family_of(student)
    for mine, theirs in zip(encoder_layers(student, f), encoder_layers(model, f)):
        kept = theirs.get_submodule(f.query).weight[[*range(0, 8), *range(16, 24)]]  # heads 0 and 2, whole
        torch.testing.assert_close(mine.get_submodule(f.query).weight, kept, atol=0, rtol=0)
        assert mine.get_submodule(f.attn_out).weight.shape == (32, 16) and self_attention(mine, f).attention_head_size == 8
    torch.testing.assert_close(logits(student, batch()), logits(model, batch()), atol=1e-5, rtol=0)  # nothing lost
    student.save_pretrained(tmp_path, safe_serialization=True)
    torch.testing.assert_close(logits(load_saved(type(student), tmp_path), batch()), logits(student, batch()), atol=0, rtol=0)


def test_pruned_heads_are_validated_and_shaped_alike_for_the_gate() -> None:
    from autotune.compress import shaped_like

    bert = teacher("bert")
    with pytest.raises(ValueError, match="attention 4 x 16 is wider than the teacher's 32"):
        make_student(bert, 2, 32, 4, 64, head_dim=16)
    with pytest.raises(ValueError, match="head_dim must be an integer >= 1"):
        make_student(bert, 2, 32, 4, 64, head_dim=0)
    stand_in = shaped_like(bert, 1, 16, 2, 32, head_dim=8, vocab_size=7)  # attention 16 wide, as wide as hidden
    assert attention_layout(stand_in) == attention_layout(make_student(bert, 1, 16, 2, 32, head_dim=8)) == (2, 16)
    assert attention_layout(shaped_like(bert, 1, 32, 1, 32, head_dim=8)) == (1, 8)


def test_bad_layer_indices_raise() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        make_student(teacher("bert"), 2, 32, 4, 64, layer_indices=[1, 1])


def test_shaped_like_builds_the_candidate_shape_with_a_smaller_token_table() -> None:
    from autotune.compress import shaped_like

    bert = teacher("bert")
    stand_in = shaped_like(bert, 1, 16, 2, 32, vocab_size=7)
    assert shape_of(stand_in) == shape_of(make_student(bert, 1, 16, 2, 32))
    assert stand_in.bert.embeddings.word_embeddings.weight.shape == (7, 16)
    assert shaped_like(bert, 1, 16, 2, 32).config.vocab_size == bert.config.vocab_size
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        shaped_like(bert, 1, 16, 2, 32, vocab_size=0)
