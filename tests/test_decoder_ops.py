"""Decoder compression operators and healing on a tiny random llama: block and FFN importance, dropping blocks,
narrowing the FFN, magnitude/Wanda pruning, top-k distillation, and the tied LM head surviving all of it."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from autotune.compress import (
    TeacherTargets,
    block_importance,
    blocks_to_keep,
    decoder_sparsity,
    drop_blocks,
    ffn_importance,
    heal,
    narrow_ffn,
    prune_decoder,
    teacher_targets,
    topk_kd_loss,
)
from autotune.compress.decoder import angular_distance, decoder_linears
from conftest import tiny_llama_config

LAYERS = 4


def tiny_llama(layers: int = LAYERS, seed: int = 0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(layers)).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def windows(model) -> torch.Tensor:
    return torch.randint(model.config.vocab_size, (8, 32), generator=torch.Generator().manual_seed(1))


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def state(model) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in model.state_dict().items()}


def assert_tied(model) -> None:
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


# --- block importance and dropping blocks ---------------------------------------------------------------------

def test_block_importance_has_one_finite_fraction_per_block(model, windows) -> None:
    importance = block_importance(model, windows)
    assert len(importance) == LAYERS
    assert all(math.isfinite(value) and 0.0 <= value <= 1.0 for value in importance)


def test_last_block_is_measured_on_the_raw_residual_stream_not_the_final_norm(model, windows) -> None:
    skewed = copy.deepcopy(model)  # a unit-weight RMSNorm only rescales each token, which a cosine cannot see
    with torch.no_grad():
        skewed.model.norm.weight.copy_(torch.linspace(0.1, 3.0, 32))
    with torch.no_grad():
        states = skewed(input_ids=windows, output_hidden_states=True, use_cache=False).hidden_states
        position = skewed.model.rotary_emb(states[-2], torch.arange(windows.shape[1]).unsqueeze(0))
        raw = skewed.model.layers[-1](states[-2], position_embeddings=position, attention_mask=None)
    raw = raw[0] if isinstance(raw, tuple) else raw
    assert torch.allclose(skewed.model.norm(raw), states[-1], atol=1e-5), "hidden_states[-1] is the normed output"
    expected = float(angular_distance(states[-2], raw).mean())
    assert expected != pytest.approx(float(angular_distance(states[-2], states[-1]).mean()), rel=1e-3)
    assert block_importance(skewed, windows)[-1] == pytest.approx(expected, rel=1e-4)


def test_blocks_to_keep_takes_the_most_important_in_ascending_order() -> None:
    assert blocks_to_keep((0.1, 0.5, 0.05, 0.3), 2) == (1, 3)
    assert blocks_to_keep((0.1, 0.5, 0.05, 0.3), 4) == (0, 1, 2, 3)
    for count in (0, 5):
        with pytest.raises(ValueError, match="count"):
            blocks_to_keep((0.1, 0.5, 0.05, 0.3), count)


def test_drop_blocks_keeps_the_requested_blocks_reindexed_and_leaves_the_input_alone(model, windows) -> None:
    before = state(model)
    dropped = drop_blocks(model, [0, 3])
    assert len(dropped.model.layers) == dropped.config.num_hidden_layers == 2
    assert [block.self_attn.layer_idx for block in dropped.model.layers] == [0, 1]
    assert dropped.config.teacher_layer_indices == [0, 3]
    assert torch.equal(dropped.model.layers[1].mlp.up_proj.weight, model.model.layers[3].mlp.up_proj.weight)
    assert len(model.model.layers) == model.config.num_hidden_layers == LAYERS
    assert [block.self_attn.layer_idx for block in model.model.layers] == list(range(LAYERS))
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert_tied(dropped)


def test_drop_blocks_slices_layer_types_when_the_config_has_them(model) -> None:
    typed = copy.deepcopy(model)
    typed.config.layer_types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    assert drop_blocks(typed, [1, 2]).config.layer_types == ["sliding_attention", "full_attention"]


def test_keeping_every_block_changes_nothing(model, windows) -> None:
    assert torch.equal(logits(drop_blocks(model, range(LAYERS)), windows), logits(model, windows))


def test_dropped_model_generates_with_a_kv_cache_and_round_trips(model, windows, tmp_path) -> None:
    from transformers import LlamaForCausalLM

    dropped = drop_blocks(model, [1, 2])
    prompt = windows[:1, :6]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=model.config.eos_token_id,
                  attention_mask=torch.ones_like(prompt))
    cached = dropped.generate(prompt, use_cache=True, **kwargs)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, dropped.generate(prompt, use_cache=False, **kwargs))
    dropped.save_pretrained(tmp_path, safe_serialization=True)
    loaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.num_hidden_layers == 2 and loaded.config.teacher_layer_indices == [1, 2]
    assert [block.self_attn.layer_idx for block in loaded.model.layers] == [0, 1]
    assert_tied(loaded)
    assert torch.allclose(logits(loaded, windows), logits(dropped, windows), atol=1e-6)


@pytest.mark.parametrize("keep", [[], [0, 4], [-1], [1, 1]])
def test_drop_blocks_rejects_bad_keep(model, keep) -> None:
    with pytest.raises(ValueError, match="keep"):
        drop_blocks(model, keep)


# --- FFN width ------------------------------------------------------------------------------------------------

def test_ffn_importance_matches_the_gated_activation(model, windows) -> None:
    importance = ffn_importance(model, windows)
    assert len(importance) == LAYERS and all(scores.shape == (64,) for scores in importance)
    mlp, captured = model.model.layers[0].mlp, []
    handle = mlp.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    with torch.no_grad():
        model(input_ids=windows, use_cache=False)
    handle.remove()
    x = captured[0]
    expected = (mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)).abs().mean(dim=(0, 1))
    assert torch.allclose(importance[0], expected, atol=1e-6)


def test_narrow_ffn_keeps_the_strongest_neurons(model, windows) -> None:
    importance = ffn_importance(model, windows)
    narrow = narrow_ffn(model, 16, importance)
    assert narrow.config.intermediate_size == 16 and model.config.intermediate_size == 64
    for block, scores, original in zip(narrow.model.layers, importance, model.model.layers):
        assert block.mlp.gate_proj.weight.shape == block.mlp.up_proj.weight.shape == (16, 32)
        assert block.mlp.down_proj.weight.shape == (32, 16)
        kept = torch.topk(scores, 16).indices.sort().values
        assert torch.equal(block.mlp.down_proj.weight, original.mlp.down_proj.weight[:, kept])
        assert torch.equal(block.mlp.gate_proj.weight, original.mlp.gate_proj.weight[kept])
    assert_tied(narrow)
    assert logits(narrow, windows).shape == logits(model, windows).shape


def test_narrow_ffn_at_full_width_changes_nothing(model, windows) -> None:
    full = narrow_ffn(model, 64, ffn_importance(model, windows))
    assert torch.allclose(logits(full, windows), logits(model, windows), atol=1e-5)


@pytest.mark.parametrize("width", [0, 65])
def test_narrow_ffn_rejects_bad_width(model, windows, width) -> None:
    with pytest.raises(ValueError, match="width"):
        narrow_ffn(model, width, ffn_importance(model, windows[:1]))


# --- pruning --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["magnitude", "wanda"])
def test_unstructured_pruning_hits_the_sparsity_in_every_row(model, windows, method) -> None:
    before = state(model)
    pruned = prune_decoder(model, 0.5, method=method, windows=windows)
    for linear in decoder_linears(pruned).values():
        zeros_per_row = (linear.weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == round(0.5 * linear.in_features))
    assert decoder_sparsity(pruned) == pytest.approx(0.5)
    assert decoder_sparsity(model) == 0.0
    assert torch.equal(pruned.model.embed_tokens.weight, before["model.embed_tokens.weight"])
    assert torch.equal(pruned.model.norm.weight, before["model.norm.weight"])
    assert_tied(pruned)
    assert not any("weight_orig" in name or "weight_mask" in name for name in pruned.state_dict())
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_two_four_pattern_keeps_two_of_every_four(model, windows) -> None:
    pruned = prune_decoder(model, None, method="wanda", pattern="2:4", windows=windows)
    for linear in decoder_linears(pruned).values():
        groups = (linear.weight != 0).reshape(linear.out_features, -1, 4).sum(dim=-1)
        assert torch.all(groups == 2)
    assert decoder_sparsity(pruned) == pytest.approx(0.5)
    assert decoder_sparsity(prune_decoder(model, 0.5, method="magnitude", pattern="2:4")) == pytest.approx(0.5)


def test_n_m_pattern_rejects_a_conflicting_sparsity(model) -> None:
    with pytest.raises(ValueError, match="sparsity"):
        prune_decoder(model, 0.3, method="magnitude", pattern="2:4")


def test_wanda_follows_the_activations_where_magnitude_cannot(model, windows) -> None:
    uneven = copy.deepcopy(model)
    with torch.no_grad():  # the first half of q/k/v's input features are 100x louder than the second half
        uneven.model.layers[0].input_layernorm.weight[:16] = 10.0
        uneven.model.layers[0].input_layernorm.weight[16:] = 0.1
    magnitude = prune_decoder(uneven, 0.5, method="magnitude")
    wanda = prune_decoder(uneven, 0.5, method="wanda", windows=windows)
    name = "model.layers.0.self_attn.q_proj"
    kept_by_wanda = decoder_linears(wanda)[name].weight != 0
    kept_by_magnitude = decoder_linears(magnitude)[name].weight != 0
    assert not torch.equal(kept_by_wanda, kept_by_magnitude)
    assert kept_by_wanda[:, :16].float().mean() > 0.9  # Wanda keeps the loud features' weights
    assert 0.3 < kept_by_magnitude[:, :16].float().mean() < 0.7  # magnitude does not see the activations


@pytest.mark.parametrize(
    "kwargs, named",
    [
        (dict(sparsity=0.5, method="wanda"), "windows"),
        (dict(sparsity=0.5, method="obs"), "method"),
        (dict(sparsity=0.5, method="magnitude", pattern="4:2"), "pattern"),
        (dict(sparsity=1.0, method="magnitude"), "sparsity"),
        (dict(sparsity=None, method="magnitude"), "sparsity"),
    ],
)
def test_prune_decoder_rejects_bad_requests(model, kwargs, named) -> None:
    with pytest.raises(ValueError, match=named):
        prune_decoder(model, **kwargs)


# --- healing --------------------------------------------------------------------------------------------------

def test_teacher_targets_are_top_k_log_probabilities_and_round_trip(model, windows, tmp_path) -> None:
    targets = teacher_targets(model, windows, k=5)
    assert targets.indices.shape == targets.logprobs.shape == (8, 32, 5)
    assert targets.indices.dtype == torch.int64 and targets.logprobs.dtype == torch.float32
    full = torch.log_softmax(logits(model, windows), dim=-1)
    assert torch.allclose(targets.logprobs[..., 0], full.max(dim=-1).values, atol=1e-6)
    assert torch.all(targets.logprobs.exp().sum(-1) < 1.0)
    path = targets.save(tmp_path / "cache" / "targets.pt")
    loaded = TeacherTargets.load(path)
    assert torch.equal(loaded.indices, targets.indices) and torch.equal(loaded.logprobs, targets.logprobs)
    assert [p.name for p in path.parent.iterdir()] == ["targets.pt"]


def test_topk_kd_loss_is_the_cross_entropy_on_the_teacher_support() -> None:
    student = torch.randn(2, 3, 7)
    teacher = torch.log_softmax(torch.randn(2, 3, 7), dim=-1)
    top = torch.topk(teacher, 7, dim=-1)  # k = vocab: the full cross-entropy
    expected = -(teacher.exp() * torch.log_softmax(student, -1)).sum(-1).mean()
    assert torch.allclose(topk_kd_loss(student, top.indices, top.values), expected)
    ids = torch.randint(7, (2, 3))
    hard = torch.nn.functional.cross_entropy(student[:, :-1].reshape(-1, 7), ids[:, 1:].reshape(-1))
    mixed = topk_kd_loss(student, top.indices, top.values, input_ids=ids, hard_weight=0.5)
    assert torch.allclose(mixed, expected + 0.5 * hard)


def test_heal_lowers_the_loss_of_a_dropped_block_student(model, windows) -> None:
    targets = teacher_targets(model, windows, k=8)
    student = drop_blocks(model, [0, 3])
    seen = []
    result = heal(student, windows, targets, tokens=30 * 4 * 32, lr=3e-3, on_step=lambda *a: seen.append(a))
    assert result.model is student and not student.training
    assert result.steps == 30 and result.tokens == 30 * 4 * 32
    assert [s[:2] for s in seen] == [(i, 30) for i in range(1, 31)]
    assert result.last_loss < result.first_loss
    assert_tied(student)


def test_heal_steps_round_up_and_cycle_through_the_windows(model, windows) -> None:
    targets = teacher_targets(model, windows[:2], k=4)
    result = heal(drop_blocks(model, [0]), windows[:2], targets, tokens=1, batch_size=4)
    assert result.steps == 1 and result.tokens == 4 * 32


@pytest.mark.parametrize("k", [0, 10_000])
def test_teacher_targets_reject_bad_k(model, windows, k) -> None:
    with pytest.raises(ValueError, match="k must"):
        teacher_targets(model, windows, k=k)


def test_heal_rejects_a_zero_budget_and_mismatched_targets(model, windows) -> None:
    targets = teacher_targets(model, windows[:2], k=4)
    with pytest.raises(ValueError, match="tokens"):
        heal(copy.deepcopy(model), windows[:2], targets, tokens=0)
    with pytest.raises(ValueError, match="targets"):
        heal(copy.deepcopy(model), windows[:3], targets, tokens=10)
