"""Tune your own classifier on your own CSV from Python, with a custom evaluation function.

    python examples/own_model/tune_own_model.py MODEL_DIR DATA.csv [--latency-ms 5] [--trials 12]

MODEL_DIR is a local Hugging Face directory (BERT, RoBERTa or DistilBERT; safetensors weights; a checkpoint
without a classification head gets one and is fine-tuned first). DATA.csv has `text` and `label` columns
(labels as ints or strings). The search maximises `balanced_accuracy` below instead of plain accuracy: any
callable (labels, logits) -> float, higher is better, can stand in.
"""

from __future__ import annotations

import argparse

import numpy as np

from autotune import tune


def balanced_accuracy(labels: np.ndarray, logits: np.ndarray) -> float:
    """Mean per-class recall: what matters when one class is rare."""
    predictions = logits.argmax(axis=1)
    recalls = [float((predictions[labels == c] == c).mean()) for c in np.unique(labels)]
    return float(np.mean(recalls))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("data_csv")
    parser.add_argument("--latency-ms", type=float, default=5.0)
    parser.add_argument("--trials", type=int, default=12)
    args = parser.parse_args()

    spec = {
        "name": "own-model",
        "model": {"path": args.model_dir, "num_labels": 2},
        "data": {"path": args.data_csv, "text_column": "text", "label_column": "label", "max_length": 128},
        "target": {"latency_ms": args.latency_ms, "percentile": 95, "batch_size": 1, "seq_len": 128},
        "space": {"preset": "bert-default", "knobs": {"bits": [32, 8]}},
    }
    result = tune(spec, trials=args.trials, metric=balanced_accuracy)
    if result.recommended is None:
        print("No configuration met the target:", result.reason)
        return
    rec = result.recommended
    print(f"{rec['description']}: balanced accuracy {rec['accuracy']['validation']:.4f} (validation), "
          f"{rec['accuracy']['test']:.4f} (test), p95 {rec['latency_ms']:.2f} ms, {rec['speedup']:.2f}x faster")
    print("Deployable artifact (ONNX + tokenizer):", rec["artifact"])
    print("Report:", result.run_dir / "report.html")


if __name__ == "__main__":
    main()
