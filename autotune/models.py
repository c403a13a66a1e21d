"""Loading BERT-family encoders for sequence classification, and where each family keeps its parts.

The compression operators (student building, pruning) need to know, per family, where the transformer
layers live and what the config calls hidden size, heads and FFN width. That knowledge sits here, in one
frozen `Family` record per supported `config.model_type`, so that no operator hard-codes module paths.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from typing import Any, NamedTuple
from pathlib import Path

import torch
from torch import nn

from search_spaces.space import TeacherShape

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A model that cannot be used: missing, unloadable, or of an unsupported family."""


@dataclass(frozen=True)
class Family:
    """Where a BERT-family sequence classifier keeps its parts.

    Paths are dotted attribute paths: `base` and the head paths start at the classifier (the
    `*ForSequenceClassification` module); `layers` starts at `base`; the per-layer paths start at one layer.
    """

    model_type: str
    # The inputs the family's forward actually uses: RoBERTa's token_type_ids is one all-zero segment and
    # DistilBERT has none, so only BERT exports them.
    inputs: tuple[str, ...]
    base: str
    layers: str
    n_layers_attr: str
    hidden_attr: str
    heads_attr: str
    ffn_attr: str
    query: str
    key: str
    value: str
    attn_out: str
    attn_norm: str
    ffn_in: str
    ffn_out: str
    ffn_norm: str
    # Linears after the encoder that map hidden -> hidden (pooler, pre-classifier), then hidden -> labels.
    head_hidden: tuple[str, ...]
    head_out: str


_BERT_LAYER = dict(
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    attn_out="attention.output.dense",
    attn_norm="attention.output.LayerNorm",
    ffn_in="intermediate.dense",
    ffn_out="output.dense",
    ffn_norm="output.LayerNorm",
)
_BERT_CONFIG = dict(
    n_layers_attr="num_hidden_layers",
    hidden_attr="hidden_size",
    heads_attr="num_attention_heads",
    ffn_attr="intermediate_size",
)

FAMILIES: dict[str, Family] = {
    "bert": Family(
        model_type="bert", inputs=("input_ids", "attention_mask", "token_type_ids"), base="bert", layers="encoder.layer", **_BERT_CONFIG, **_BERT_LAYER,
        head_hidden=("bert.pooler.dense",), head_out="classifier",
    ),
    "roberta": Family(
        model_type="roberta", inputs=("input_ids", "attention_mask"), base="roberta", layers="encoder.layer", **_BERT_CONFIG, **_BERT_LAYER,
        head_hidden=("classifier.dense",), head_out="classifier.out_proj",
    ),
    "distilbert": Family(
        model_type="distilbert", inputs=("input_ids", "attention_mask"), base="distilbert", layers="transformer.layer",
        n_layers_attr="n_layers", hidden_attr="dim", heads_attr="n_heads", ffn_attr="hidden_dim",
        query="attention.q_lin", key="attention.k_lin", value="attention.v_lin", attn_out="attention.out_lin",
        attn_norm="sa_layer_norm", ffn_in="ffn.lin1", ffn_out="ffn.lin2", ffn_norm="output_layer_norm",
        head_hidden=("pre_classifier",), head_out="classifier",
    ),
}

SUPPORTED = tuple(sorted(FAMILIES))


def family_for_type(model_type: str, where: str = "the model") -> Family:
    """The `Family` of a `config.model_type`, or a one-sentence `ModelError` naming what is supported."""
    family = FAMILIES.get(model_type)
    if family is None:
        raise ModelError(
            f"{where} has model_type '{model_type}', but autotune supports only {', '.join(SUPPORTED)}."
        )
    return family


def family_of(model: nn.Module) -> Family:
    """The `Family` of a loaded model, read from its config."""
    return family_for_type(getattr(model.config, "model_type", "unknown"))


def encoder_layers(model: nn.Module, family: Family | None = None) -> nn.ModuleList:
    """The ModuleList of transformer layers."""
    family = family or family_of(model)
    return model.get_submodule(f"{family.base}.{family.layers}")


#: The config attribute recording a student's head width when its attention is narrower than hidden (HF's
#: BERT-family configs derive the head width from hidden / heads); saved in config.json, so the layout loads back.
HEAD_DIM_ATTR = "autotune_head_dim"


def self_attention(layer: nn.Module, family: Family) -> nn.Module:
    """The module that splits a layer's heads (the query projection's parent): it holds the head size and scale."""
    return layer.get_submodule(family.query.rsplit(".", 1)[0])


def attention_layout(model: nn.Module) -> tuple[int, int]:
    """(heads, attention width) of a model's layers, what ONNX Runtime's attention fusion must be told."""
    family, config = family_of(model), model.config
    heads, head_dim = getattr(config, family.heads_attr), getattr(config, HEAD_DIM_ATTR, None)
    return heads, heads * head_dim if head_dim else getattr(config, family.hidden_attr)


def _narrower(old: nn.Linear, in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=old.bias is not None, dtype=old.weight.dtype)


def narrow_attention(model: nn.Module, head_dim: int) -> nn.Module:
    """Every layer's attention as the config's heads of `head_dim` each: Q, K, V and the output projection replaced
    by Linears of that width (fresh weights, for a caller to fill), the head size and softmax scale set, and the
    config told (HEAD_DIM_ATTR). The model's forward reshapes by the head size, so it runs as it is."""
    family, config = family_of(model), model.config
    heads, hidden = getattr(config, family.heads_attr), getattr(config, family.hidden_attr)
    width = heads * head_dim
    for layer in encoder_layers(model, family):
        for path in (family.query, family.key, family.value):
            parent, name = path.rsplit(".", 1)
            setattr(layer.get_submodule(parent), name, _narrower(layer.get_submodule(path), hidden, width))
        parent, name = family.attn_out.rsplit(".", 1)
        setattr(layer.get_submodule(parent), name, _narrower(layer.get_submodule(family.attn_out), width, hidden))
        attention = self_attention(layer, family)
        attention.attention_head_size, attention.scaling = head_dim, head_dim ** -0.5
        if hasattr(attention, "all_head_size"):
            attention.all_head_size = width
    setattr(config, HEAD_DIM_ATTR, head_dim)
    return model


def load_saved(model_class: type, path: str | Path) -> nn.Module:
    """A model written by `save_pretrained` (safetensors), in eval mode and in the attention layout its config
    records: `from_pretrained` would build the default layout and refuse the narrower weights."""
    from safetensors.torch import load_file
    from transformers.utils import SAFE_WEIGHTS_NAME

    config = model_class.config_class.from_pretrained(path)
    head_dim = getattr(config, HEAD_DIM_ATTR, None)
    if head_dim is None:
        return model_class.from_pretrained(path, use_safetensors=True).eval()
    model = narrow_attention(model_class(config), head_dim)
    model.load_state_dict(load_file(Path(path) / SAFE_WEIGHTS_NAME))
    return model.eval()


def shape_of(model: nn.Module) -> TeacherShape:
    """The four numbers that decide an encoder's cost (depth, width, heads, FFN width), in the search space's
    own type, since its presets are derived from the teacher's shape."""
    family = family_of(model)
    config = model.config
    return TeacherShape(
        layers=getattr(config, family.n_layers_attr),
        hidden=getattr(config, family.hidden_attr),
        heads=getattr(config, family.heads_attr),
        ffn=getattr(config, family.ffn_attr),
    )


def _is_head_key(key: str, family: Family) -> bool:
    """Parameters a checkpoint may lack without harm: the pooler and classifier, which get a fresh init.

    `bert.pooler.dense` owns `bert.pooler.*`, `classifier` owns `classifier.*`: each head path's parent.
    """
    owners = tuple(path.rsplit(".", 1)[0] + "." for path in (*family.head_hidden, family.head_out))
    return key.startswith(owners)


def _check_path(path: str | Path) -> None:
    """Reject a local-looking path that does not exist before transformers tries the hub with it."""
    text = str(path)
    local_looking = isinstance(path, Path) or text.startswith(("/", ".", "~")) or text.count("/") > 1
    if local_looking and not Path(text).expanduser().exists():
        raise ModelError(f"Model path '{text}' does not exist.")


class LoadedClassifier(NamedTuple):
    """A loaded model and tokenizer; `new_head` says the classifier head is freshly initialised (untrained)."""

    model: nn.Module
    tokenizer: Any
    new_head: bool


def load_classifier(
    path: str | Path,
    num_labels: int,
    *,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> "LoadedClassifier":
    """Load a BERT-family sequence classifier and its tokenizer, in eval mode.

    Weights come only from safetensors unless `allow_pickle` (a pickle can run code on load). A checkpoint
    without a classification head, or with one for a different number of labels, gets a fresh head, and the
    log says so: such a model must be fine-tuned before its accuracy means anything.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    _check_path(path)
    source = str(Path(path).expanduser()) if isinstance(path, Path) else str(path)
    if trust_remote_code:
        log.warning("Loading '%s' with trust_remote_code=True: code shipped with the model will run.", source)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ModelError(f"Cannot load a model config from '{source}' ({type(error).__name__}).") from error
    family = family_for_type(config.model_type, where=f"The model at '{source}'")
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=num_labels,
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,
            output_loading_info=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        hint = "" if allow_pickle else " (only safetensors weights are read unless allow_pickle=True)"
        raise ModelError(f"Cannot load the model weights or tokenizer from '{source}'{hint}.") from error
    new = sorted(set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]})
    foreign = [key for key in new if not _is_head_key(key, family)]
    if foreign:
        raise ModelError(f"The checkpoint at '{source}' lacks encoder weights such as '{foreign[0]}'.")
    if new:
        log.warning(
            "'%s' has no classification head for %d labels; a new head was initialised (%s).",
            source, num_labels, ", ".join(new),
        )
    model.eval()
    return LoadedClassifier(model, tokenizer, new_head=bool(new))


def state_fingerprint(model: nn.Module) -> str:
    """A sha256 over names, shapes and bytes of every tensor in the state dict: a cache key for weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().to(torch.float32 if tensor.is_floating_point() else tensor.dtype)
                      .contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()
