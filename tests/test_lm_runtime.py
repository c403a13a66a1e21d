"""Causal LMs as deployed: the GenAI builder's export with a KV cache, weight-only quantization, perplexity and
agreement on the artifact, and TTFT/decode timing in a child process; all on a tiny random llama."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from autotune.runtime.genai import (
    ExportError, LMArtifact, WeightOnly, cache_shape, empty_cache_feeds, export_causal_lm, greedy_continuation,
)
from autotune.tasks.lm_quality import _session, score_lm, window_logits
from profilers.generation import GenerationError, GenerationRequest, measure_generation, measure_generations
from conftest import save_tiny_llama


@pytest.fixture(scope="module")
def fp32_artifact(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> LMArtifact:
    return export_causal_lm(tiny_llama_dir, tmp_path_factory.mktemp("lm") / "fp32")


@pytest.fixture(scope="module")
def torch_model(tiny_llama_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()


def windows(n: int = 3, length: int = 24, vocab: int = 31, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, size=(n, length))


def nbits_nodes(artifact: LMArtifact) -> dict[str, dict[str, int]]:
    graph = onnx.load(str(artifact.onnx_path), load_external_data=False).graph
    return {node.name: {a.name: a.i for a in node.attribute} for node in graph.node if node.op_type == "MatMulNBits"}


def test_fp32_export_matches_torch_logits_with_and_without_a_kv_cache(fp32_artifact: LMArtifact, torch_model) -> None:
    ids = windows(1, 20)[0]
    with torch.no_grad():
        expected = torch_model(torch.tensor(ids[None])).logits[0].numpy()
    session, shape = _session(fp32_artifact.directory, 1), cache_shape(fp32_artifact.directory)
    np.testing.assert_allclose(window_logits(session, ids, shape), expected, atol=1e-4)

    # Prefill 12 tokens, then feed the 13th alone with the returned KV cache: the step's logits are the torch
    # model's at position 12.
    prefix = ids[:12].reshape(1, -1)
    layers = shape[0]
    feeds = empty_cache_feeds(prefix, shape)
    names = [o.name for o in session.get_outputs()]
    outputs = dict(zip(names, session.run(None, feeds)))
    step = {"input_ids": ids[12:13].reshape(1, 1), "attention_mask": np.ones((1, 13), dtype=np.int64)}
    step |= {f"past_key_values.{i}.{kind}": outputs[f"present.{i}.{kind}"] for i in range(layers) for kind in ("key", "value")}
    np.testing.assert_allclose(session.run(["logits"], step)[0][0, -1], expected[12], atol=1e-4)


@pytest.mark.parametrize("weights, bits, block", [
    (WeightOnly(bits=4, block_size=32), 4, 32),
    (WeightOnly(bits=8, block_size=16, accuracy_level=4), 8, 16),
    (WeightOnly(bits=4, block_size=32, method="rtn-asym"), 4, 32),
    (WeightOnly(bits=4, block_size=16, method="k-quant"), 4, 16),
    (WeightOnly(bits=4, block_size=32, method="hqq"), 4, 32),
    (WeightOnly(bits=4, block_size=16, method="rtn-offset"), 4, 16),
    (WeightOnly(bits=4, block_size=16, method="gptq"), 4, 16),
])
def test_weight_only_quantizes_every_linear_at_its_bits_and_block(tiny_llama_dir: Path, tmp_path: Path,
                                                                  weights: WeightOnly, bits: int, block: int) -> None:
    artifact = export_causal_lm(tiny_llama_dir, tmp_path / weights.name, weights, calibration=windows(2, 16))
    nodes = nbits_nodes(artifact)
    # 2 blocks x (qkv, o, gate, up, down) + the LM head
    assert len(nodes) == 11
    assert {(n["bits"], n["block_size"]) for n in nodes.values()} == {(bits, block)}
    assert all(n.get("accuracy_level", 0) == weights.accuracy_level for n in nodes.values()) or weights.method == "hqq"
    score = score_lm(artifact.directory, windows())
    assert np.isfinite(score.perplexity)


@pytest.mark.parametrize("head_bits, head_node", [(8, "/lm_head/MatMul_Q8"), (32, None)])
def test_the_lm_head_has_its_own_width(tiny_llama_dir: Path, tmp_path: Path, head_bits: int, head_node: str | None) -> None:
    nodes = nbits_nodes(export_causal_lm(tiny_llama_dir, tmp_path / "q", WeightOnly(bits=4, head_bits=head_bits)))
    assert np.isfinite(score_lm(tmp_path / "q", windows()).perplexity)  # ONNX Runtime loads and runs it
    heads = [name for name in nodes if name.startswith("/lm_head/")]
    assert heads == ([head_node] if head_node else [])
    assert {n["bits"] for name, n in nodes.items() if not name.startswith("/lm_head/")} == {4}


@pytest.mark.parametrize("weights, heads", [
    (WeightOnly(bits=4, method="rtn-offset", head_bits=8), {"/lm_head/MatMul_Q8": 8}),
    (WeightOnly(bits=4, method="rtn-offset", head_int8_rows=5), {"/lm_head/MatMul_first5_Q8": 8, "/lm_head/MatMul_rest": 4}),
])
def test_an_offset_grid_head_is_int8_in_whole_or_in_its_first_rows(tiny_llama_dir: Path, tmp_path: Path,
                                                                   weights: WeightOnly, heads: dict[str, int]) -> None:
    nodes = nbits_nodes(export_causal_lm(tiny_llama_dir, tmp_path / "q", weights))
    assert {name: n["bits"] for name, n in nodes.items() if name.startswith("/lm_head/")} == heads
    assert np.isfinite(score_lm(tmp_path / "q", windows()).perplexity)  # ONNX Runtime loads and runs it


def test_the_search_keeps_a_sixth_of_a_4_bit_offset_head_at_int8() -> None:
    from autotune.tasks.causal_lm import weight_only
    from search_spaces import Candidate

    shape = dict(layers=2, hidden=32, heads=4, ffn=64, bits=4, block_size=32, sensitive_int8=False, heal_tokens=0)
    rows = {(method, head): weight_only(Candidate.canonical(**shape, method=method, head_bits=head), 49152).head_int8_rows
            for method in ("rtn", "rtn-offset") for head in (4, 8)}
    assert rows == {("rtn", 4): 0, ("rtn", 8): 0, ("rtn-offset", 4): 8192, ("rtn-offset", 8): 0}


def snap_to_q4_1(model_dir: Path, out_dir: Path, block: int = 32) -> Path:
    """The llama of `model_dir` with every decoder linear's weight on GGUF Q4_1 grids (blocks of `block` along the
    input, each spanning its own min to max in 15 steps), as a model converted from a Q4_1 GGUF is."""
    from transformers import AutoModelForCausalLM

    from conftest import write_lm_tokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("proj.weight"):
                blocks = parameter.reshape(parameter.shape[0], -1, block)
                low, high = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
                step = (high - low) / 15
                parameter.copy_((low + torch.round((blocks - low) / step) * step).reshape(parameter.shape))
    model.save_pretrained(out_dir, safe_serialization=True)
    write_lm_tokenizer(out_dir)
    return out_dir


def test_offsets_kept_reproduce_a_q4_1_model_that_integer_zero_points_cannot(tiny_llama_dir: Path,
                                                                               tmp_path: Path) -> None:
    snapped = snap_to_q4_1(tiny_llama_dir, tmp_path / "q4_1")
    ids = windows(1, 20)[0]

    def logits(weights: WeightOnly | None) -> np.ndarray:
        artifact = export_causal_lm(snapped, tmp_path / (weights.name if weights else "fp32"), weights)
        return window_logits(_session(artifact.directory, 1), ids, cache_shape(artifact.directory))

    exact = logits(None)
    # fp32 activations (accuracy level 0) and an fp32 head, so only the body's weights differ
    kept = np.abs(logits(WeightOnly(method="rtn-offset", head_bits=32, accuracy_level=0)) - exact).max()
    requantized = np.abs(logits(WeightOnly(method="rtn-asym", head_bits=32, accuracy_level=0)) - exact).max()
    assert kept < requantized / 50


def test_the_sensitive_layers_stay_at_int8_in_an_int4_body(tmp_path: Path) -> None:
    eight_blocks = save_tiny_llama(tmp_path / "eight", layers=8)
    artifact = export_causal_lm(eight_blocks, tmp_path / "q", WeightOnly(bits=4, sensitive_int8=True))
    nodes = nbits_nodes(artifact)
    int8 = [name for name, node in nodes.items() if node["bits"] == 8]
    assert int8 and all("/layers." in name for name in int8)  # the LM head stays with the body here
    assert {node["bits"] for name, node in nodes.items() if name not in int8} == {4}
    assert {0, 7} <= {int(re.search(r"/layers\.(\d+)/", name).group(1)) for name in int8}  # the first and last blocks
    assert np.isfinite(score_lm(artifact.directory, windows()).perplexity)  # ONNX Runtime loads and runs it


def test_quantized_artifacts_are_smaller(fp32_artifact: LMArtifact, tiny_llama_dir: Path, tmp_path: Path) -> None:
    int8 = export_causal_lm(tiny_llama_dir, tmp_path / "int8", WeightOnly(bits=8))
    int4 = export_causal_lm(tiny_llama_dir, tmp_path / "int4", WeightOnly(bits=4))
    assert int4.size_bytes < int8.size_bytes < fp32_artifact.size_bytes


@pytest.mark.parametrize("kwargs, field", [({"bits": 3}, "bits"), ({"block_size": 48}, "block_size"),
                                           ({"method": "gptq-ish"}, "method"), ({"head_bits": 6}, "head_bits"),
                                           ({"bits": 8, "method": "hqq"}, "hqq"), ({"accuracy_level": 7}, "accuracy_level"),
                                           ({"bits": 8, "sensitive_int8": True}, "sensitive_int8"),
                                           ({"method": "hqq", "sensitive_int8": True}, "sensitive_int8"),
                                           ({"method": "rtn-offset", "sensitive_int8": True}, "sensitive_int8"),
                                           ({"bits": 8, "method": "rtn-offset"}, "4 bits only"),
                                           ({"method": "hqq", "head_bits": 8}, "LM head"),
                                           ({"head_int8_rows": 64}, "head_int8_rows"),
                                           ({"method": "rtn-offset", "head_bits": 8, "head_int8_rows": 64},
                                            "head_int8_rows")])
def test_weight_only_rejects_what_no_kernel_runs(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        WeightOnly(**kwargs)


def test_k_quant_refuses_an_odd_number_of_blocks(tiny_llama_dir: Path, tmp_path: Path) -> None:
    # hidden 32 in blocks of 32 is one block per column: ONNX Runtime's k-quant cannot pack its zero points
    with pytest.raises(ExportError, match="even number of 32-weight blocks"):
        export_causal_lm(tiny_llama_dir, tmp_path / "kq", WeightOnly(bits=4, block_size=32, method="k-quant"))


def test_gptq_needs_calibration_text(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="calibration"):
        export_causal_lm(tiny_llama_dir, tmp_path / "gptq", WeightOnly(bits=4, method="gptq"))


def test_export_of_a_directory_without_a_model_is_one_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="could not export"):
        export_causal_lm(tmp_path / "empty", tmp_path / "out")


def test_perplexity_on_the_artifact_equals_the_torch_model_s(fp32_artifact: LMArtifact, torch_model) -> None:
    data = windows()
    with torch.no_grad():
        loss = torch_model(torch.tensor(data), labels=torch.tensor(data)).loss.item()
    score = score_lm(fp32_artifact.directory, data, threads=1)
    assert score.perplexity == pytest.approx(np.exp(loss), rel=1e-4)
    assert score.tokens == data.shape[0] * (data.shape[1] - 1)
    assert score_lm(fp32_artifact.directory, data, reference=score.predictions).agreement == 1.0


@pytest.mark.parametrize("weights", [None, WeightOnly(bits=4, block_size=16, method="rtn-offset")])
def test_a_prompt_s_lm_head_on_its_last_token_alone_generates_and_scores_as_on_every_token(
        fp32_artifact: LMArtifact, tiny_llama_dir: Path, tmp_path: Path, weights: WeightOnly | None) -> None:
    full = fp32_artifact if weights is None else export_causal_lm(tiny_llama_dir, tmp_path / "full", weights)
    last = export_causal_lm(tiny_llama_dir, tmp_path / "last", weights, last_logits_only=True)
    graph = onnx.load(str(last.onnx_path), load_external_data=False).graph
    logits = next(output for output in graph.output if output.name == "logits")
    assert logits.type.tensor_type.shape.dim[1].dim_value == 1  # what GenAI reads as last-token logits
    prompt = windows(1, 12)[0].tolist()
    assert greedy_continuation(last.directory, prompt, 6) == greedy_continuation(full.directory, prompt, 6)
    data = windows()
    expected = score_lm(full.directory, data)
    scored = score_lm(last.directory, data, reference=expected.predictions)
    assert scored.perplexity == pytest.approx(expected.perplexity, rel=1e-6) and scored.agreement == 1.0


def test_the_every_position_view_refuses_a_pruned_head_it_does_not_know() -> None:
    from onnx import TensorProto, helper

    from autotune.tasks.lm_quality import every_position_view

    gather = helper.make_node("Gather", ["hidden", "last"], ["picked"], name="/lm_head/prune/Gather", axis=1)
    graph = helper.make_graph([gather], "g", [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, 4, 8])],
                              [helper.make_tensor_value_info("picked", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor("last", TensorProto.INT64, [], [-1])])
    with pytest.raises(ValueError, match="not a graph this view knows"):
        every_position_view(helper.make_model(graph))
    assert every_position_view(helper.make_model(helper.make_graph([], "plain", [], []))) is False


def test_agreement_falls_when_the_model_differs(fp32_artifact: LMArtifact, torch_model, tiny_llama_dir: Path,
                                               tmp_path: Path) -> None:
    # A random tiny llama with tied embeddings predicts its input token back; blocks with large weights do not.
    import copy
    import shutil

    changed = copy.deepcopy(torch_model)
    with torch.no_grad():
        for parameter in changed.model.layers.parameters():
            parameter.add_(torch.randn_like(parameter))
    changed.save_pretrained(tmp_path / "changed")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_llama_dir / name, tmp_path / "changed" / name)
    data = windows(4, 32)
    teacher = score_lm(fp32_artifact.directory, data)
    other = export_causal_lm(tmp_path / "changed", tmp_path / "changed-onnx")
    student = score_lm(other.directory, data, reference=teacher.predictions)
    assert 0.0 <= student.agreement < 1.0


def test_score_rejects_windows_it_cannot_use(fp32_artifact: LMArtifact) -> None:
    with pytest.raises(ValueError, match="windows must be"):
        score_lm(fp32_artifact.directory, np.zeros((2, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="reference predictions"):
        score_lm(fp32_artifact.directory, windows(), reference=np.zeros((1, 5), dtype=np.int64))


def test_generation_timing_reports_ttft_decode_and_memory(fp32_artifact: LMArtifact) -> None:
    request = GenerationRequest(str(fp32_artifact.directory), prompt_len=16, context_len=32, threads=1, vocab_size=31,
                                runs=3, decode_tokens=4, decode_rounds=2)
    stats = measure_generation(request)
    assert stats.ttft.runs == 3 and stats.decode.runs == 3 * 2 * 4  # each prefill decodes twice, rewound between
    assert 0 < stats.ttft.p50_ms <= stats.ttft.p95_ms and 0 < stats.decode.p50_ms <= stats.decode.p95_ms
    assert stats.peak_rss_bytes > 10 * 2**20  # the runtime and the model are resident
    assert (stats.prompt_len, stats.context_len) == (16, 32)


def test_models_timed_together_take_turns_each_in_its_own_child(fp32_artifact: LMArtifact) -> None:
    def request(context_len: int) -> GenerationRequest:
        return GenerationRequest(str(fp32_artifact.directory), prompt_len=4, context_len=context_len, threads=1,
                                 vocab_size=31, runs=2, decode_tokens=3, decode_rounds=1)

    short, long = measure_generations([request(8), request(24)])
    assert (short.context_len, long.context_len) == (8, 24)  # in the order asked
    assert short.ttft.runs == long.ttft.runs == 2 and short.decode.runs == long.decode.runs == 2 * 3
    assert short.peak_rss_bytes > 10 * 2**20 and long.peak_rss_bytes > 10 * 2**20  # each child's own


def test_models_timed_together_are_refused_without_models_or_with_unequal_runs(fp32_artifact: LMArtifact,
                                                                               tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least one model"):
        measure_generations([])
    one = GenerationRequest(str(fp32_artifact.directory), prompt_len=4, context_len=8, threads=1, vocab_size=31, runs=1)
    with pytest.raises(ValueError, match="same number of runs"):
        measure_generations([one, dataclasses.replace(one, runs=2)])
    with pytest.raises(GenerationError, match=f"timing {tmp_path} failed in a child process"):
        measure_generations([one, dataclasses.replace(one, model_dir=str(tmp_path))])  # the second cannot load


def test_peak_memory_is_the_child_s_own_not_its_parent_s(fp32_artifact: LMArtifact) -> None:
    # A parent holding 600 MB must not lend its peak to the child (ru_maxrss would).
    ballast = np.ones(600 * 2**20 // 8)
    request = GenerationRequest(str(fp32_artifact.directory), prompt_len=4, context_len=8, threads=1, vocab_size=31,
                                runs=1, decode_tokens=1)
    assert measure_generation(request).peak_rss_bytes < 500 * 2**20
    del ballast


def test_a_prompt_longer_than_the_context_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than context_len"):
        GenerationRequest("unused", prompt_len=64, context_len=32, threads=1, vocab_size=31)


def test_a_request_without_decode_rounds_is_refused() -> None:
    with pytest.raises(ValueError, match="decode_rounds"):
        GenerationRequest("unused", prompt_len=4, context_len=8, threads=1, vocab_size=31, decode_rounds=0)


def test_timing_a_missing_model_is_one_error(tmp_path: Path) -> None:
    with pytest.raises(GenerationError, match="failed in a child process"):
        measure_generation(GenerationRequest(str(tmp_path), prompt_len=4, context_len=8, threads=1, vocab_size=31, runs=1))
