"""Build a smaller student of the same family, initialised from the teacher's own weights.

A student that starts as a slice of its teacher distils in a fraction of the steps a random one needs. The
rules, so that a given shape always yields the same student:

- Layers: `layers` of the teacher's layers, evenly spaced and always including the first and the last:
  index i keeps teacher layer `i * (L_t - 1) // (L_s - 1)` (6 -> 3 keeps [0, 2, 5]; 12 -> 6 keeps
  [0, 2, 4, 6, 8, 11]); a one-layer student keeps layer 0, whose input (the embeddings) it was trained on.
  `layer_indices` overrides. The kept indices are recorded as `config.teacher_layer_indices`, which the
  hidden-state loss of distillation uses to pair layers.
- Hidden dims: ranked by summed weight magnitude over every tensor that reads or writes the residual
  stream (embeddings, LayerNorms, Q/K/V/O, FFN, pooler, classifier), each tensor's score normalised to
  sum 1 so that no single big matrix decides alone; with a `calibration` batch, by mean |activation| of
  the hidden states instead. The top `hidden` dims are kept, in their original order, in every tensor.
- Heads: the student's head size is d_s = hidden / heads (HF requires it). A unit (head h, dim d) of the
  teacher scores |q_hd| |k_hd| + |v_hd| |o_hd| (row/column norms: how much it moves attention scores plus
  how much it writes to the output); a head scores the sum over its dims. The top
  m = max(heads, ceil(hidden / d_t)) teacher heads are kept, in original order; each contributes an equal
  share of the `hidden` units (its best dims), and the concatenation is cut into `heads` heads of d_s.
  So when d_s <= d_t each student head is one teacher head narrowed to its best d_s dims, and when
  d_s > d_t (384/12 -> 256/4) each student head is consecutive teacher heads side by side. Q is scaled by
  sqrt(d_s / d_t) so that the 1/sqrt(head_dim) softmax temperature stays the teacher's.
  With `head_dim` the attention is heads x head_dim wide instead of `hidden` (autotune.models.narrow_attention):
  at the teacher's head width that keeps the `heads` best teacher heads whole (head pruning), the same rule.
- FFN neurons: ranked by |W_in row| * |W_out col|, per layer.

A student with the teacher's own shape is the teacher (same logits), which the tests hold it to.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from autotune.models import Family, encoder_layers, family_of, narrow_attention, shape_of
from search_spaces import TeacherShape


def even_layer_indices(teacher_layers: int, layers: int) -> tuple[int, ...]:
    """Evenly spaced teacher layers, first and last included (see the module docstring)."""
    if layers == 1:
        return (0,)
    return tuple(i * (teacher_layers - 1) // (layers - 1) for i in range(layers))


def _validate(teacher: TeacherShape, student: TeacherShape, layer_indices: Sequence[int] | None,
              head_dim: int | None = None) -> tuple[int, ...]:
    for name in ("layers", "hidden", "heads", "ffn"):
        value, limit = getattr(student, name), getattr(teacher, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Student {name} must be an integer >= 1, got {value!r}.")
        if value > limit:
            raise ValueError(f"Student {name}={value} exceeds the teacher's {limit}; a student can only shrink.")
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"Student head_dim must be an integer >= 1, got {head_dim!r}.")
    if head_dim is not None and student.heads * head_dim > teacher.hidden:
        raise ValueError(f"Student attention {student.heads} x {head_dim} is wider than the teacher's "
                         f"{teacher.hidden}; a student can only shrink.")
    if student.hidden % student.heads:
        raise ValueError(
            f"Student hidden={student.hidden} is not a multiple of heads={student.heads}; "
            "transformers builds an encoder's layers only when the heads divide hidden."
        )
    if layer_indices is None:
        return even_layer_indices(teacher.layers, student.layers)
    kept = tuple(int(i) for i in layer_indices)
    if len(kept) != student.layers or list(kept) != sorted(set(kept)) or not all(0 <= i < teacher.layers for i in kept):
        raise ValueError(
            f"layer_indices={list(kept)} must be {student.layers} strictly increasing indices in [0, {teacher.layers})."
        )
    return kept


def _share(scores: torch.Tensor) -> torch.Tensor:
    """A score vector normalised to sum 1, so tensors of different scale weigh the same."""
    scores = scores.detach().abs().float()
    return scores / scores.sum().clamp_min(1e-12)


def _linear(root: nn.Module, path: str) -> nn.Linear | None:
    try:
        module = root.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.Linear) else None


def _head_linears(model: nn.Module, family: Family) -> tuple[list[nn.Linear], nn.Linear]:
    hidden = [m for m in (_linear(model, p) for p in family.head_hidden) if m is not None]
    return hidden, model.get_submodule(family.head_out)


def _embedding_modules(model: nn.Module, family: Family) -> list[nn.Module]:
    """Every Embedding and LayerNorm under the base model's `embeddings` block."""
    block = model.get_submodule(f"{family.base}.embeddings")
    return [m for m in block.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))]


def hidden_importance_from_weights(model: nn.Module) -> torch.Tensor:
    """One score per hidden dim: its normalised magnitude summed over all residual-stream tensors."""
    family = family_of(model)
    total = torch.zeros(shape_of(model).hidden)
    for module in _embedding_modules(model, family):
        total += _share(module.weight.norm(dim=0) if isinstance(module, nn.Embedding) else module.weight)
    for layer in encoder_layers(model, family):
        for path in (family.query, family.key, family.value, family.ffn_in):
            total += _share(layer.get_submodule(path).weight.norm(dim=0))
        for path in (family.attn_out, family.ffn_out):
            total += _share(layer.get_submodule(path).weight.norm(dim=1))
        for path in (family.attn_norm, family.ffn_norm):
            total += _share(layer.get_submodule(path).weight)
    head_hidden, head_out = _head_linears(model, family)
    for linear in head_hidden:
        total += _share(linear.weight.norm(dim=0)) + _share(linear.weight.norm(dim=1))
    return total + _share(head_out.weight.norm(dim=0))


@torch.no_grad()
def hidden_importance_from_activations(model: nn.Module, calibration: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One score per hidden dim: mean |activation| over all hidden states and real (unmasked) tokens."""
    was_training = model.training
    model.eval()
    outputs = model(**calibration, output_hidden_states=True)
    model.train(was_training)
    states = torch.stack(outputs.hidden_states)  # [layers + 1, batch, seq, hidden]
    mask = calibration.get("attention_mask")
    mask = torch.ones(states.shape[1:3]) if mask is None else mask.float()
    weighted = states.abs() * mask[None, :, :, None]
    return weighted.sum(dim=(0, 1, 2)) / (mask.sum() * states.shape[0]).clamp_min(1.0)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, in ascending index order (keeps the original layout)."""
    return torch.sort(torch.topk(scores, k).indices).values


def _attention_units(layer: nn.Module, family: Family, teacher_heads: int, heads: int, width: int) -> torch.Tensor:
    """Indices into the teacher's attention width (heads * d_t) that make the student's (`heads` heads, `width`
    wide), head by head."""
    q, k, v = (layer.get_submodule(p).weight for p in (family.query, family.key, family.value))
    o = layer.get_submodule(family.attn_out).weight
    unit = q.norm(dim=1) * k.norm(dim=1) + v.norm(dim=1) * o.norm(dim=0)
    head_dim = unit.numel() // teacher_heads
    per_head = unit.view(teacher_heads, head_dim)
    kept_heads = max(heads, math.ceil(width / head_dim))
    kept = _top(per_head.sum(dim=1), kept_heads)
    quotas = [width // kept_heads + (i < width % kept_heads) for i in range(kept_heads)]
    return torch.cat([h * head_dim + _top(per_head[h], quota) for h, quota in zip(kept.tolist(), quotas)])


def _ffn_units(layer: nn.Module, family: Family, ffn: int) -> torch.Tensor:
    w_in = layer.get_submodule(family.ffn_in).weight
    w_out = layer.get_submodule(family.ffn_out).weight
    return _top(w_in.norm(dim=1) * w_out.norm(dim=0), ffn)


def _copy_linear(dst: nn.Linear, src: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None,
                 scale: float = 1.0) -> None:
    weight = src.weight if rows is None else src.weight[rows]
    weight = weight if cols is None else weight[:, cols]
    dst.weight.copy_(weight * scale)
    if src.bias is not None:
        dst.bias.copy_((src.bias if rows is None else src.bias[rows]) * scale)


def _copy_vector_module(dst: nn.Module, src: nn.Module, dims: torch.Tensor) -> None:
    """A LayerNorm (weight, bias over hidden) or an Embedding (rows of hidden vectors)."""
    if isinstance(src, nn.Embedding):
        dst.weight.copy_(src.weight[:, dims])
        return
    dst.weight.copy_(src.weight[dims])
    if src.bias is not None:
        dst.bias.copy_(src.bias[dims])


def _student_config(teacher: nn.Module, family: Family, shape: TeacherShape, kept_layers: tuple[int, ...]):
    config = copy.deepcopy(teacher.config)
    setattr(config, family.n_layers_attr, shape.layers)
    setattr(config, family.hidden_attr, shape.hidden)
    setattr(config, family.heads_attr, shape.heads)
    setattr(config, family.ffn_attr, shape.ffn)
    config.teacher_layer_indices = list(kept_layers)
    return config


def _copy_layer(dst: nn.Module, src: nn.Module, family: Family, teacher: TeacherShape, student: TeacherShape,
                head_dim: int | None, dims: torch.Tensor) -> None:
    """One teacher layer sliced into a student layer: its heads and FFN neurons kept by importance, the hidden
    dims `dims`; queries rescaled so that attention logits keep their scale at the student's head width."""
    width = student.hidden if head_dim is None else student.heads * head_dim
    units = _attention_units(src, family, teacher.heads, student.heads, width)
    neurons = _ffn_units(src, family, student.ffn)
    q_scale = math.sqrt((width / student.heads) / (teacher.hidden / teacher.heads))
    for path, scale in ((family.query, q_scale), (family.key, 1.0), (family.value, 1.0)):
        _copy_linear(dst.get_submodule(path), src.get_submodule(path), units, dims, scale)
    _copy_linear(dst.get_submodule(family.attn_out), src.get_submodule(family.attn_out), dims, units)
    _copy_linear(dst.get_submodule(family.ffn_in), src.get_submodule(family.ffn_in), neurons, dims)
    _copy_linear(dst.get_submodule(family.ffn_out), src.get_submodule(family.ffn_out), dims, neurons)
    for path in (family.attn_norm, family.ffn_norm):
        _copy_vector_module(dst.get_submodule(path), src.get_submodule(path), dims)


@torch.no_grad()
def make_student(
    teacher: nn.Module,
    layers: int,
    hidden: int,
    heads: int,
    ffn: int,
    *,
    head_dim: int | None = None,
    layer_indices: Sequence[int] | None = None,
    calibration: Mapping[str, torch.Tensor] | None = None,
) -> nn.Module:
    """A student of the teacher's class and family, its weights sliced from the teacher (module docstring).

    `head_dim` narrows the attention to heads x head_dim (None: hidden / heads per head). `calibration` is a
    tokenised batch (`input_ids`, `attention_mask`, ...) whose activations rank the hidden dims; without it
    weight magnitudes do. The student is returned in eval mode, on the CPU dtype of the teacher, as an ordinary
    HF model that `save_pretrained` and `autotune.models.load_saved` round-trip (`from_pretrained` too when its
    attention is as wide as hidden).
    """
    family = family_of(teacher)
    teacher_shape = shape_of(teacher)
    shape = TeacherShape(layers=layers, hidden=hidden, heads=heads, ffn=ffn)
    kept_layers = _validate(teacher_shape, shape, layer_indices, head_dim)

    hidden_scores = (
        hidden_importance_from_weights(teacher) if calibration is None
        else hidden_importance_from_activations(teacher, calibration)
    )
    dims = _top(hidden_scores, hidden)

    student = _built(type(teacher)(_student_config(teacher, family, shape, kept_layers)), head_dim).to(
        dtype=next(teacher.parameters()).dtype
    )
    filled: set[int] = set()

    def mark(*modules: nn.Module) -> None:
        filled.update(id(p) for m in modules for p in m.parameters())

    for dst, src in zip(_embedding_modules(student, family), _embedding_modules(teacher, family)):
        _copy_vector_module(dst, src, dims)
        mark(dst)

    teacher_layers, student_layers = encoder_layers(teacher, family), encoder_layers(student, family)
    for dst, index in zip(student_layers, kept_layers):
        _copy_layer(dst, teacher_layers[index], family, teacher_shape, shape, head_dim, dims)
        mark(dst)

    (dst_hidden, dst_out), (src_hidden, src_out) = _head_linears(student, family), _head_linears(teacher, family)
    for dst, src in zip(dst_hidden, src_hidden):
        _copy_linear(dst, src, dims, dims)
        mark(dst)
    _copy_linear(dst_out, src_out, None, dims)
    mark(dst_out)

    unfilled = [name for name, p in student.named_parameters() if id(p) not in filled]
    if unfilled:
        raise RuntimeError(f"make_student left parameters at random init: {', '.join(unfilled)}.")
    return student.eval()


def _built(student: nn.Module, head_dim: int | None) -> nn.Module:
    """A student model as its config builds it, its attention narrowed where `head_dim` says so."""
    return student if head_dim is None else narrow_attention(student, head_dim)


def shaped_like(
    teacher: nn.Module, layers: int, hidden: int, heads: int, ffn: int, *, head_dim: int | None = None,
    vocab_size: int | None = None,
) -> nn.Module:
    """A model of the teacher's family in the student's shape, with random weights.

    The latency gate times this instead of a trained student: latency depends on shape and bits, not on the
    values of the weights, and building it costs no slicing and no training. Shapes are validated exactly
    as `make_student` validates them.

    `vocab_size` shrinks the token embedding table. At inference the table is only gathered from (one row
    per token), so its size does not change latency, but MiniLM's 30,522 x 384 table is most of the bytes
    that export, fusion and quantization copy: a small table makes the gate's stand-in several times
    cheaper to build.
    """
    family = family_of(teacher)
    shape = TeacherShape(layers=layers, hidden=hidden, heads=heads, ffn=ffn)
    kept_layers = _validate(shape_of(teacher), shape, None, head_dim)
    config = _student_config(teacher, family, shape, kept_layers)
    if vocab_size is not None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        config.vocab_size = vocab_size
    return _built(type(teacher)(config), head_dim).eval()
