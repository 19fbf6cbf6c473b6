"""The compute-precision policy: bf16 autocast only where the CPU multiplies bf16 natively."""

from __future__ import annotations

import pytest
import torch

from lloco_index import defaults, precision

AVX2_ONLY = {"fpu", "sse2", "avx", "avx2", "fma"}
AVX512_BF16 = AVX2_ONLY | {"avx512f", "avx512_bf16"}
AMX = AVX2_ONLY | {"avx512f", "amx_tile", "amx_bf16"}


@pytest.fixture(autouse=True)
def _clean_policy(monkeypatch):
    monkeypatch.delenv(defaults.DTYPE_ENV, raising=False)
    precision.set_precision(None)
    saved = dict(precision._decision_cache)
    precision._decision_cache.clear()
    yield
    precision.set_precision(None)
    precision._decision_cache.clear()
    precision._decision_cache.update(saved)


def _fake_cpu(monkeypatch, capability: str, flags: set[str]) -> None:
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(precision, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize("capability, flags, expected", [
    ("AVX2", AVX2_ONLY, False),
    ("AVX512", AVX2_ONLY | {"avx512f"}, False),  # AVX512 without the BF16 extension still emulates bf16
    ("AVX512", AVX512_BF16, True),
    ("AVX512", AMX, True),
    ("DEFAULT", {"fp", "asimd", "bf16"}, True),  # Arm with the BF16 extension
    ("DEFAULT", {"fp", "asimd"}, None),  # Arm without it: only a measurement can tell
    ("DEFAULT", set(), None),  # no /proc/cpuinfo (macOS, Windows)
])
def test_decision_from_capability(capability, flags, expected):
    assert precision.decide_cpu_bf16(capability, flags) is expected


def test_autocast_is_off_on_a_cpu_without_bf16_hardware(monkeypatch):
    _fake_cpu(monkeypatch, "AVX2", AVX2_ONLY)
    monkeypatch.setattr(precision, "measure_cpu_bf16", lambda: pytest.fail("flags decide; no measurement"))
    with precision.autocast("cpu"):
        assert not torch.is_autocast_enabled("cpu")
        assert (torch.randn(4, 8) @ torch.randn(8, 4)).dtype == torch.float32
    assert precision.compute_dtype("cpu") == torch.float32


def test_autocast_is_on_where_bf16_is_native_but_not_for_decode_steps(monkeypatch):
    _fake_cpu(monkeypatch, "AVX512", AVX512_BF16)
    with precision.autocast("cpu"):
        assert (torch.randn(4, 8) @ torch.randn(8, 4)).dtype == torch.bfloat16
    with precision.generation_autocast("cpu"):
        assert (torch.randn(4, 8) @ torch.randn(8, 4)).dtype == torch.float32


def test_overrides_win_in_order_keyword_process_env(monkeypatch):
    _fake_cpu(monkeypatch, "AVX2", AVX2_ONLY)
    monkeypatch.setenv(defaults.DTYPE_ENV, "bf16")
    assert precision.compute_dtype("cpu") == torch.bfloat16
    assert precision.compute_dtype("cpu", decode=True) == torch.bfloat16  # an explicit request reaches decoding
    precision.set_precision("float32")
    assert precision.compute_dtype("cpu") == torch.float32
    assert precision.compute_dtype("cpu", "bfloat16") == torch.bfloat16


def test_unknown_precision_is_refused_with_the_choices(monkeypatch):
    monkeypatch.setenv(defaults.DTYPE_ENV, "float8")
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        precision.compute_dtype("cpu")


def test_ambiguous_cpu_is_measured_once_and_cached(monkeypatch, tmp_path):
    monkeypatch.setenv(defaults.CACHE_DIR_ENV, str(tmp_path))
    _fake_cpu(monkeypatch, "DEFAULT", {"fp", "asimd"})
    calls = []
    monkeypatch.setattr(precision, "measure_cpu_bf16",
                        lambda: calls.append(1) or {"float32_s": 1.0, "bfloat16_s": 3.0, "bf16_faster": False})
    assert precision.compute_dtype("cpu") == torch.float32
    precision._decision_cache.clear()  # a new process: the file answers
    assert precision.compute_dtype("cpu") == torch.float32
    assert len(calls) == 1 and (tmp_path / "precision.json").is_file()


def test_real_measurement_returns_timings():
    result = precision.measure_cpu_bf16(repeats=2)
    assert result["float32_s"] > 0 and result["bfloat16_s"] > 0 and isinstance(result["bf16_faster"], bool)


def test_finetune_config_reads_old_bf16_flag_and_resumes_across_precisions():
    from lloco_index.finetune.config import FinetuneConfig

    assert FinetuneConfig.from_dict({"bf16": False}).dtype == "float32"
    assert FinetuneConfig(dtype="bf16").dtype == "bfloat16"
    assert FinetuneConfig(dtype="float32").training_hash() == FinetuneConfig(dtype="auto").training_hash()


def test_cli_prints_the_mode(capsys):
    from lloco_index.cli import main

    assert main(["precision", "--dtype", "float32"]) == 0
    assert "float32 requested" in capsys.readouterr().out
