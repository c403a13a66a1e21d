"""What "accuracy" means for a causal LM, measured on the deployable ONNX artifact in ONNX Runtime.

- Perplexity: exp of the mean next-token negative log-likelihood over fixed windows of held-out text. Each window
  is scored on its own from an empty KV cache (positions 1..L-1 predicted from their prefix), so figures compare
  across models only at the same window length, which every caller fixes.
- Agreement: the fraction of positions where the model's most likely next token is the teacher's. Perplexity
  says how well the model knows the text; agreement says how closely it imitates the teacher, which is what a
  compressed model is for.

Both come from the artifact a user deploys (the builder's graph, quantized), not from the torch model it came
from: quantization and graph rewrites change the numbers, and the number that matters is the deployed one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from autotune.runtime.genai import cache_shape, empty_cache_feeds

if TYPE_CHECKING:
    import onnx


@dataclass(frozen=True)
class LMScore:
    """Perplexity and agreement of one model on one set of windows; `predictions` are its top-1 next tokens
    ([windows, length-1]), the reference a student's agreement is measured against when this is the teacher."""

    perplexity: float
    agreement: float | None
    tokens: int
    predictions: np.ndarray

    def to_dict(self) -> dict[str, float | int | None]:
        """The figures, without the predictions (result files, bench rows)."""
        return {"perplexity": self.perplexity, "agreement": self.agreement, "tokens": self.tokens}


#: The nodes the builder's `prune_lm_head` puts before the LM head: the last position's hidden state, given back
#: its sequence axis.
PRUNE_GATHER, PRUNE_UNSQUEEZE = "/prune/Gather", "/prune/Unsqueeze"


def every_position_view(model: onnx.ModelProto) -> bool:
    """Give, in place, a graph whose LM head sees the last position alone (the builder's `prune_lm_head`) the hidden
    states of every position again, so it yields logits [batch, sequence, vocab] from the same weights; whether it
    was such a graph. Shapes the builder recorded for the single position are dropped for ONNX Runtime to infer."""
    graph = model.graph
    gather = next((n for n in graph.node if n.op_type == "Gather" and n.name.endswith(PRUNE_GATHER)), None)
    if gather is None:
        return False
    unsqueeze = next((n for n in graph.node if n.op_type == "Unsqueeze" and n.name.endswith(PRUNE_UNSQUEEZE)
                      and n.input[0] == gather.output[0]), None)
    if unsqueeze is None:
        raise ValueError(f"{gather.name} does not feed the builder's {PRUNE_UNSQUEEZE}: not a graph this view knows")
    for node in graph.node:
        node.input[:] = [gather.input[0] if name == unsqueeze.output[0] else name for name in node.input]
    graph.node.remove(gather)
    graph.node.remove(unsqueeze)
    index = gather.input[1]  # the position's constant: left unread, ONNX Runtime would warn as it drops it
    if not any(index in node.input for node in graph.node):
        for unread in [node for node in graph.node if list(node.output) == [index]]:
            graph.node.remove(unread)
        for unread in [init for init in graph.initializer if init.name == index]:
            graph.initializer.remove(unread)
    logits = next(output for output in graph.output if output.name == "logits")
    logits.type.tensor_type.shape.dim[1].dim_param = "sequence_length"
    del graph.value_info[:]
    return True


def _session(model_dir: Path, threads: int | None):
    """An ONNX Runtime session of the model in `model_dir` with logits at every position (`every_position_view`
    of a graph built with the prompt's LM head on its last token; its weights read from `model_dir` as they are)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    source: str | bytes = str(model_dir / "model.onnx")
    model = onnx.load(source, load_external_data=False)
    if every_position_view(model):
        source = model.SerializeToString()
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def window_logits(session, window: np.ndarray, cache_shape: tuple[int, int, int]) -> np.ndarray:
    """Logits [length, vocab] of one window, run from an empty KV cache (past length 0)."""
    return session.run(["logits"], empty_cache_feeds(window.reshape(1, -1), cache_shape))[0][0]


def score_lm(model_dir: str | Path, windows: np.ndarray, reference: np.ndarray | None = None,
             threads: int | None = None) -> LMScore:
    """Perplexity of the GenAI model in `model_dir` over `windows` ([n, length] token ids), and its top-1 agreement
    with `reference` (another model's `predictions` on the same windows; None: agreement is not measured)."""
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n >= 1, length >= 2] token ids, got shape {windows.shape}")
    if reference is not None and reference.shape != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"reference predictions have shape {reference.shape}, expected "
                         f"{(windows.shape[0], windows.shape[1] - 1)} for these windows")
    model_dir = Path(model_dir)
    session, shape = _session(model_dir, threads), cache_shape(model_dir)
    nll, predictions = 0.0, np.empty((windows.shape[0], windows.shape[1] - 1), dtype=np.int64)
    for index, window in enumerate(windows):
        logprobs = _log_softmax(window_logits(session, window, shape)[:-1])
        nll -= float(logprobs[np.arange(len(window) - 1), window[1:]].sum())
        predictions[index] = logprobs.argmax(axis=-1)
    tokens = predictions.size
    agreement = None if reference is None else float((predictions == reference).mean())
    return LMScore(perplexity=float(np.exp(nll / tokens)), agreement=agreement, tokens=tokens, predictions=predictions)
