"""HardwareOptimizer decisions, on described devices and on this machine."""

import pytest

from compress.__main__ import main as compress_main
from compress.hardware import DeviceInfo, HardwareOptimizer, detect


@pytest.mark.parametrize("info,recipe,kernel", [
    (DeviceInfo("cuda", "H100", 16, [], (9, 0)), "bf16", None),
    (DeviceInfo("cuda", "A100", 16, [], (8, 0)), "bf16", None),
    (DeviceInfo("cuda", "T4", 8, [], (7, 5)), "fp16", None),
    (DeviceInfo("mps", "Apple MPS", 8), "fp16", None),
    (DeviceInfo("cpu", "Sapphire Rapids", 2, ["avx2", "avx512f", "avx512_bf16", "amx_bf16"]), "int8", "weight_only"),
    (DeviceInfo("cpu", "Skylake", 4, ["avx2", "avx512f"]), "int8-dynamic", "dynamic"),
    (DeviceInfo("cpu", "Graviton", 4, ["asimd"]), "int8", "weight_only"),
])
def test_plan_picks_precision_for_device(info, recipe, kernel):
    plan = HardwareOptimizer(info).plan()
    assert (plan.recipe, plan.int8_kernel) == (recipe, kernel)
    assert plan.reasons and plan.threads == info.cores


def test_detect_describes_this_machine():
    info = detect()
    assert info.kind in ("cpu", "cuda", "mps") and info.cores >= 1 and info.name


def test_build_auto_records_plan(llama_dir, tmp_path, capsys):
    import json

    out = tmp_path / "auto"
    assert compress_main(["build", "--model-dir", str(llama_dir), "--recipe", "auto", "--out", str(out)]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["recipe"] == HardwareOptimizer().plan().recipe
    assert m["hardware"]["plan"]["reasons"]
    assert capsys.readouterr().out.startswith("auto -> ")
