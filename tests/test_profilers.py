"""The hardware profile agrees with what the OS says, round-trips through JSON, and fingerprints stably."""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from profilers.cpu import cpuinfo_cache_path, inference_flags, parse_cache_size, raw_cpu_info
from profilers.gpu import cuda_version_text, probe_gpus
from profilers.hardware import (
    SCHEMA_VERSION, HardwareProfile, ProfileError, collect_profile, load_profile, profile_for,
)
from profilers.microbench import MicrobenchSizes, merge_rounds, run_gpu_microbench
from profilers.predictor import Throughput


@pytest.fixture(scope="module")
def facts() -> HardwareProfile:
    return collect_profile(microbench=False)


@pytest.fixture(scope="module")
def quick() -> HardwareProfile:
    return collect_profile(quick=True)


def proc_cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def test_cpu_facts_match_the_os(facts: HardwareProfile) -> None:
    assert facts.cpu.logical_cores == os.cpu_count()
    assert 1 <= facts.cpu.physical_cores <= facts.cpu.logical_cores
    assert facts.cpu.numa_nodes >= 1
    assert facts.cpu.model_name and facts.cpu.model_name != "unknown"


@pytest.mark.skipif(not Path("/proc/cpuinfo").exists(), reason="needs Linux /proc/cpuinfo")
def test_isa_flags_are_the_inference_subset_of_proc_cpuinfo(facts: HardwareProfile) -> None:
    assert set(facts.cpu.flags) == set(inference_flags(sorted(proc_cpuinfo_flags())))
    if "avx2" in proc_cpuinfo_flags():
        assert "avx2" in facts.cpu.flags
    assert "smep" not in facts.cpu.flags  # security flags are not inference ISA


def test_flags_take_the_kernel_spelling_whichever_library_reported_them() -> None:
    # py-cpuinfo reports CPUID names (avx512vnni, avxvnni, amxint8) beside the kernel's; one name per feature.
    reported = ["AVX2", "avx512vnni", "avx512_vnni", "avxvnni", "amxint8", "amx_tile", "smep"]
    assert inference_flags(reported) == ("amx_int8", "amx_tile", "avx2", "avx512_vnni", "avx_vnni")


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="needs Linux /proc/meminfo")
def test_memory_total_matches_proc_meminfo(facts: HardwareProfile) -> None:
    line = next(l for l in Path("/proc/meminfo").read_text().splitlines() if l.startswith("MemTotal:"))
    assert facts.memory.total_bytes == int(line.split()[1]) * 1024
    assert 0 < facts.memory.available_bytes <= facts.memory.total_bytes


CPUINFO = "processor\t: 0\nmodel name\t: Some CPU\ncpu MHz\t\t: {mhz}\nflags\t\t: {flags}\nbogomips\t: {mhz}\n"


def test_py_cpuinfo_s_answer_is_kept_per_boot_and_per_cpu_description(tmp_path: Path) -> None:
    boot, proc = tmp_path / "boot_id", tmp_path / "cpuinfo"
    boot.write_text("boot-1\n")
    proc.write_text(CPUINFO.format(mhz="2400.1", flags="avx avx2"))
    first = cpuinfo_cache_path(boot, proc)
    assert first is not None and first.parent == Path(tempfile.gettempdir())
    proc.write_text(CPUINFO.format(mhz="3100.7", flags="avx avx2"))  # the clock moves: the same CPU
    assert cpuinfo_cache_path(boot, proc) == first
    proc.write_text(CPUINFO.format(mhz="3100.7", flags="avx avx2 avx512f"))  # another CPU description
    other_cpu = cpuinfo_cache_path(boot, proc)
    boot.write_text("boot-2\n")
    assert len({first, other_cpu, cpuinfo_cache_path(boot, proc)}) == 3
    assert cpuinfo_cache_path(tmp_path / "no-boot-id", proc) is None  # not Linux: no cache, every process probes


def test_a_kept_answer_is_read_without_probing_and_a_broken_one_probed_over(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import cpuinfo

    probes: list[int] = []
    monkeypatch.setattr(cpuinfo, "get_cpu_info", lambda: probes.append(1) or {"brand_raw": "Probed", "flags": ["avx2"]})
    kept = tmp_path / "kept.json"
    kept.write_text(json.dumps({"brand_raw": "Kept", "flags": []}))
    assert raw_cpu_info(kept)["brand_raw"] == "Kept" and probes == []
    for broken in ("{\"brand_raw\": ", "[1, 2]"):  # half a file (as a crash leaves one), or not py-cpuinfo's dict
        kept.write_text(broken)
        assert raw_cpu_info(kept)["brand_raw"] == "Probed"
        assert json.loads(kept.read_text())["brand_raw"] == "Probed"  # written for the next process
    assert raw_cpu_info(None)["brand_raw"] == "Probed" and len(probes) == 3
    assert raw_cpu_info(tmp_path / "unwritable" / "kept.json")["brand_raw"] == "Probed"  # no place to keep it: fine
    (tmp_path / "folder.json").mkdir()  # the rename fails: the temp file goes too
    assert raw_cpu_info(tmp_path / "folder.json")["brand_raw"] == "Probed"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.json", "kept.json"]  # no temp file left behind


def test_cache_size_parsing() -> None:
    assert parse_cache_size("32K") == 32 * 1024
    assert parse_cache_size("1024K\n") == 1024 * 1024
    assert parse_cache_size("32M") == 32 * 1024**2
    with pytest.raises(ValueError):
        parse_cache_size("lots")


@pytest.mark.slow
def test_quick_microbench_measures_positive_figures_with_methods(quick: HardwareProfile) -> None:
    bench = quick.microbench
    assert bench is not None and bench.threads == quick.threads
    assert bench.fp32_gemm_gflops > 1 and bench.int8_gemm_gops > 1 and bench.memory_bandwidth_gbps > 0.5
    assert bench.fp32_chain_gflops > 1 and bench.int8_chain_gops > 1 and bench.int4_chain_gflops > 1
    assert bench.small_op_us is not None and 0 < bench.small_op_us < 10_000
    assert bench.elementwise_gbps is not None and 0.01 < bench.elementwise_gbps < 10_000
    for name in ("fp32_gemm_gflops", "int8_gemm_gops", "memory_bandwidth_gbps", "fp32_chain_gflops", "int8_chain_gops",
                 "int4_chain_gflops", "small_op_us", "elementwise_gbps"):
        method = bench.methods[name]
        assert method.threads == quick.threads and method.runs >= 5 and method.shape
    assert bench.methods["elementwise_gbps"].shape == "12 x 64x384"
    machine = Throughput.of(quick)  # the predictor divides by the encoder-regime figures, not the peak ones
    assert (machine.fp32_gflops, machine.int8_gops, machine.int4_gflops, machine.small_op_ms, machine.elementwise_gbps) == (
        bench.fp32_chain_gflops, bench.int8_chain_gops, bench.int4_chain_gflops, bench.small_op_us / 1000,
        bench.elementwise_gbps)


@pytest.mark.slow
def test_rounds_keep_each_figures_geometric_mean_and_every_rounds_value(quick: HardwareProfile) -> None:
    bench = quick.microbench
    assert bench is not None
    fast, slow = (replace(bench, fp32_chain_gflops=v, small_op_us=u) for v, u in ((135.0, 5.0), (85.0, 20.0)))
    merged = merge_rounds([fast, fast, slow])
    # One slow round in three moves the figure by its share (a median would ignore it; two would flip it).
    assert merged.fp32_chain_gflops == pytest.approx((135.0 * 135.0 * 85.0) ** (1 / 3), abs=0.01)
    assert merged.small_op_us == pytest.approx((5.0 * 5.0 * 20.0) ** (1 / 3), abs=0.01)
    assert merged.int8_chain_gops == bench.int8_chain_gops  # equal rounds merge to their value
    method = merged.methods["fp32_chain_gflops"]
    assert method.round_values == (135.0, 135.0, 85.0) and method.statistic == "geometric mean of 3 rounds"
    assert method.runs == 3 * bench.methods["fp32_chain_gflops"].runs
    assert merge_rounds([bench, replace(bench, small_op_us=None)]).small_op_us is None  # an older round lacks it
    assert merge_rounds([bench]) is bench  # one round is the profile as measured, methods untouched
    with pytest.raises(ValueError, match="same thread count"):
        merge_rounds([bench, replace(bench, threads=bench.threads + 1)])
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        collect_profile(rounds=0)
    with pytest.raises(ValueError, match="interval_s must be >= 0"):
        collect_profile(rounds=2, interval_s=-1.0)
    two = collect_profile(1, quick=True, rounds=2)
    assert two.microbench is not None and len(two.microbench.methods["int8_chain_gops"].round_values) == 2
    assert HardwareProfile.from_json(two.to_json()) == two


@pytest.mark.slow
def test_rounds_wait_the_interval_between_them_only(quick: HardwareProfile, monkeypatch: pytest.MonkeyPatch) -> None:
    import profilers.hardware as hardware

    bench = quick.microbench
    assert bench is not None
    measured = iter([replace(bench, fp32_chain_gflops=v) for v in (90.0, 110.0, 100.0)])
    events: list[str] = []
    monkeypatch.setattr(hardware, "run_cpu_microbench", lambda threads, sizes, recipe: events.append("round") or next(measured))
    monkeypatch.setattr(hardware.time, "sleep", lambda seconds: events.append(f"wait {seconds}"))
    profile = hardware.with_throughput(replace(quick, microbench=None), quick=True, rounds=3, interval_s=30.0)
    assert events == ["round", "wait 30.0", "round", "wait 30.0", "round"]
    assert profile.microbench is not None
    assert profile.microbench.methods["fp32_chain_gflops"].round_values == (90.0, 110.0, 100.0)  # every round kept


@pytest.mark.slow
def test_json_names_that_other_parts_rely_on(quick: HardwareProfile) -> None:
    data = json.loads(quick.to_json())
    assert data["schema_version"] == SCHEMA_VERSION
    assert isinstance(data["cpu"]["logical_cores"], int) and isinstance(data["cpu"]["physical_cores"], int)
    assert isinstance(data["cpu"]["flags"], list) and isinstance(data["memory"]["total_bytes"], int)
    assert isinstance(data["gpus"], list)
    for key in ("fp32_gemm_gflops", "int8_gemm_gops", "memory_bandwidth_gbps"):
        assert isinstance(data["microbench"][key], float)
    assert data["fingerprint"] == quick.fingerprint


@pytest.mark.slow
def test_json_round_trip_is_exact(quick: HardwareProfile, tmp_path: Path) -> None:
    assert HardwareProfile.from_json(quick.to_json()) == quick
    path = tmp_path / "box.json"
    path.write_text(quick.to_json())
    assert load_profile(path) == quick


def test_fingerprint_is_stable_and_tracks_what_determines_speed(facts: HardwareProfile) -> None:
    again = collect_profile(microbench=False)
    assert again.fingerprint == facts.fingerprint
    assert replace(facts, threads=facts.threads + 1).fingerprint != facts.fingerprint
    other_cpu = replace(facts.cpu, model_name=facts.cpu.model_name + " v2")
    assert replace(facts, cpu=other_cpu).fingerprint != facts.fingerprint
    fewer_cores = replace(facts.cpu, physical_cores=facts.cpu.physical_cores + 2, logical_cores=facts.cpu.logical_cores + 2)
    assert replace(facts, cpu=fewer_cores).fingerprint != facts.fingerprint
    # Volatile facts do not move it.
    assert replace(facts, memory=replace(facts.memory, available_bytes=1)).fingerprint == facts.fingerprint


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("{not json", "not valid JSON (line 1"),
        ("[1, 2]", "not a JSON object"),
        ('{"schema_version": 99}', "schema_version 99"),
        ('{"schema_version": 1, "threads": 2}', "not a valid hardware profile: field"),
    ],
)
def test_bad_profiles_are_refused_in_one_sentence(text: str, fragment: str) -> None:
    with pytest.raises(ProfileError, match="^hardware profile") as info:
        HardwareProfile.from_json(text)
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_edited_profile_fails_its_fingerprint_check(quick: HardwareProfile) -> None:
    data = quick.to_dict()
    data["cpu"]["logical_cores"] += 1
    with pytest.raises(ProfileError, match="fingerprint does not match"):
        HardwareProfile.from_dict(data)


def test_missing_profile_file(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile(tmp_path / "absent.json")


def test_a_run_finds_this_machine_s_profile_at_its_threads_in_a_folder(quick: HardwareProfile, tmp_path: Path) -> None:
    (tmp_path / "here.json").write_text(quick.to_json(), encoding="utf-8")
    (tmp_path / "more-threads.json").write_text(replace(quick, threads=quick.threads + 3).to_json(), encoding="utf-8")
    (tmp_path / "notes.txt").write_text("not a profile", encoding="utf-8")
    probed = replace(quick, microbench=None, created_at="later")
    assert profile_for(tmp_path, probed) == quick
    assert profile_for(tmp_path / "here.json", probed) == quick
    with pytest.raises(ProfileError, match=f"autotune profile --threads {quick.threads + 1} -o FILE"):
        profile_for(tmp_path, replace(probed, threads=quick.threads + 1))  # a run at a thread count not profiled
    unmeasured = tmp_path / "unmeasured"
    unmeasured.mkdir()
    (unmeasured / "facts.json").write_text(probed.to_json(), encoding="utf-8")
    with pytest.raises(ProfileError, match=r"not measured\)"):
        profile_for(unmeasured, probed)  # the facts alone (autotune profile without its microbenchmarks)


# ---- GPUs through a fake NVML: there is no GPU on the CI machine ----------------------------------------


class NVMLError(Exception):
    pass


def fake_nvml(devices: list[dict], *, init_error: Exception | None = None, count_error: Exception | None = None,
              unsupported: frozenset[str] = frozenset()) -> SimpleNamespace:
    """A stand-in for pynvml. `unsupported` names queries that raise as NVML's NotSupported would."""

    def query(name, fn):
        def call(*args):
            if name in unsupported:
                raise NVMLError(f"{name}: Not Supported")
            return fn(*args)
        call.__name__ = name
        return call

    def init():
        if init_error:
            raise init_error

    def count():
        if count_error:
            raise count_error
        return len(devices)

    return SimpleNamespace(
        NVML_CLOCK_SM=1, NVML_CLOCK_MEM=2,
        nvmlInit=init, nvmlShutdown=lambda: None, nvmlDeviceGetCount=count,
        nvmlSystemGetDriverVersion=query("driver", lambda: b"580.95"),
        nvmlSystemGetCudaDriverVersion=query("cuda", lambda: 13000),
        nvmlDeviceGetHandleByIndex=lambda i: devices[i],
        nvmlDeviceGetName=lambda h: h["name"],
        nvmlDeviceGetUUID=query("uuid", lambda h: h["uuid"]),
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=h["total"], free=h["free"], used=h["total"] - h["free"]),
        nvmlDeviceGetCudaComputeCapability=query("capability", lambda h: h["cc"]),
        nvmlDeviceGetAttributes_v2=query("attributes", lambda h: SimpleNamespace(multiprocessorCount=h["sms"])),
        nvmlDeviceGetMaxClockInfo=query("clocks", lambda h, kind: h["clocks"][kind]),
        nvmlDeviceGetPowerManagementLimit=query("power", lambda h: h["power_mw"]),
    )


H200 = {"name": "NVIDIA H200", "uuid": "GPU-1111", "total": 143771 << 20, "free": 140000 << 20, "cc": (9, 0),
        "sms": 132, "clocks": {1: 1980, 2: 3201}, "power_mw": 700000}
L4 = {"name": b"NVIDIA L4", "uuid": b"GPU-2222", "total": 23034 << 20, "free": 22000 << 20, "cc": (8, 9),
      "sms": 58, "clocks": {1: 2040, 2: 6251}, "power_mw": 72000}


def test_fake_nvml_reports_every_gpu() -> None:
    gpus, reason = probe_gpus(fake_nvml([H200, L4]))
    assert reason is None and len(gpus) == 2
    h200, l4 = gpus
    assert (h200.name, h200.uuid, h200.compute_capability, h200.sm_count) == ("NVIDIA H200", "GPU-1111", "9.0", 132)
    assert (h200.max_sm_clock_mhz, h200.max_memory_clock_mhz, h200.power_limit_w) == (1980, 3201, 700.0)
    assert (h200.driver_version, h200.cuda_driver_version) == ("580.95", "13.0")
    assert l4.name == "NVIDIA L4" and l4.uuid == "GPU-2222" and l4.index == 1  # bytes from old bindings decoded


def test_unsupported_nvml_queries_become_none() -> None:
    gpus, reason = probe_gpus(fake_nvml([H200], unsupported=frozenset({"attributes", "power", "clocks", "cuda"})))
    assert reason is None
    assert gpus[0].sm_count is None and gpus[0].power_limit_w is None and gpus[0].max_sm_clock_mhz is None
    assert gpus[0].cuda_driver_version is None and gpus[0].memory_total_bytes == H200["total"]


@pytest.mark.parametrize(
    ("nvml", "fragment"),
    [
        (fake_nvml([], init_error=NVMLError("NVML Shared Library Not Found")), "NVML unavailable"),
        (fake_nvml([]), "no NVIDIA GPU"),
        (fake_nvml([H200], count_error=NVMLError("Unknown Error")), "NVML query failed"),
    ],
)
def test_no_gpu_is_an_empty_list_and_a_reason(nvml: SimpleNamespace, fragment: str) -> None:
    gpus, reason = probe_gpus(nvml)
    assert gpus == () and fragment in reason


def test_gpu_figures_fingerprint_and_json(facts: HardwareProfile) -> None:
    gpus, _ = probe_gpus(fake_nvml([H200]))
    measured = run_gpu_microbench(gpus, MicrobenchSizes.for_mode(True), measure_one=lambda g, dev, plan: replace(
        g, fp16_gemm_tflops=700.0, bf16_gemm_tflops=690.0, memory_bandwidth_gbps=4000.0))
    with_gpu = replace(facts, gpus=measured, gpu_unavailable_reason=None)
    data = json.loads(with_gpu.to_json())
    gpu = data["gpus"][0]
    import torch

    if torch.cuda.is_available():
        assert gpu["fp16_gemm_tflops"] == 700.0 and gpu["bf16_gemm_tflops"] == 690.0 and gpu["memory_bandwidth_gbps"] == 4000.0
    else:  # without CUDA torch the figures stay unmeasured rather than invented
        assert gpu["fp16_gemm_tflops"] is None and gpu["memory_bandwidth_gbps"] is None
    assert HardwareProfile.from_dict(data) == with_gpu
    assert with_gpu.fingerprint != facts.fingerprint
    other_uuid = replace(with_gpu, gpus=(replace(measured[0], uuid="GPU-9999"),))
    assert other_uuid.fingerprint == with_gpu.fingerprint  # the uuid names a card, not its speed


def test_cuda_version_decoding() -> None:
    assert cuda_version_text(12040) == "12.4" and cuda_version_text(13000) == "13.0" and cuda_version_text(None) is None
