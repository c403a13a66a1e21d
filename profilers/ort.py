"""ONNX Runtime sessions configured for honest timing.

Every place that times an ONNX model (microbenchmarks, the latency harness, the deployment runtime) builds its
session here, so thread count and spinning are set the same way everywhere. Several default sessions alive in
one process inflate every latency several-fold on a machine with few cores, because each idle session's intra-op
threads spin while another runs. Spinning is therefore off unless a caller asks for it.
"""

from __future__ import annotations

import os
from typing import Sequence

import onnxruntime as ort

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"


def providers_for(device: str) -> tuple[str, ...]:
    """ONNX Runtime providers for a target device, the CPU last as ORT's fallback for nodes CUDA does not run."""
    return (CUDA_PROVIDER, CPU_PROVIDER) if device == "cuda" else (CPU_PROVIDER,)


def make_session(
    model: str | os.PathLike[str] | bytes,
    *,
    threads: int,
    providers: Sequence[str] = (CPU_PROVIDER,),
    allow_spinning: bool = False,
    optimization_level: ort.GraphOptimizationLevel = ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
) -> ort.InferenceSession:
    """An InferenceSession with `threads` intra-op threads, one inter-op thread and sequential execution.

    `model` is a path or serialized ModelProto bytes. Unknown providers raise ValueError naming those available.
    """
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    available = ort.get_available_providers()
    missing = [p for p in providers if p not in available]
    if missing:
        raise ValueError(f"ONNX Runtime provider(s) {missing} not available here; available: {available}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = optimization_level
    options.log_severity_level = 3
    spinning = "1" if allow_spinning else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, sess_options=options, providers=list(providers))


def session_threads(session: ort.InferenceSession) -> int:
    """The intra-op thread count a session was created with (0 means ORT's default: all physical cores)."""
    return int(session.get_session_options().intra_op_num_threads)


def cpu_runs_natively(elem_type: int) -> bool:
    """Whether ONNX Runtime's CPU provider has its own MatMul kernel for `elem_type` (an onnx.TensorProto type)
    on this CPU. Where it has none it still runs the model, by inserting Casts to fp32 around the MatMul: that is
    no fp16/bf16 kernel, only extra work, so the search must not offer the precision. The probe reads the graph
    ORT optimised for this machine, which says which kernel it chose (milliseconds, no timing involved)."""
    import tempfile

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem_type)
    weight = numpy_helper.from_array(np.ones((16, 16), dtype=dtype), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["X", "W"], ["Y"])], "probe",
                              [helper.make_tensor_value_info("X", elem_type, [4, 16])],
                              [helper.make_tensor_value_info("Y", elem_type, [4, 16])], [weight])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with tempfile.TemporaryDirectory(prefix="autotune-probe-") as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.log_severity_level = 3
        try:
            ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=[CPU_PROVIDER])
        except Exception:  # noqa: BLE001 - no kernel at all for this type is "not native" too
            return False
        chosen = onnx.load(options.optimized_model_filepath)
    return not any(node.op_type == "Cast" for node in chosen.graph.node)
