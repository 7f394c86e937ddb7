"""onnxruntime int8 of the exported graphs: dynamic and static (QDQ) stay close to the float export, hold int8
operators, and the quantized folder is read by the torch-free runner in a fresh process to the same answers; other
execution providers and bad requests are clear errors.

Tolerances (tiny seeded model, width 32; largest absolute difference on L2-normalised embeddings): ≤ 0.06 (static
calibrated on other data than the test inputs), ≤ 0.03 (dynamic).
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from cli_helpers import REPO, cli_env  # noqa: E402
from test_quantization import manifest, tiny  # noqa: E402, F401  (the tiny model and its calibration manifest)

from mmformer.compress.onnx_quantization import quantize_export  # noqa: E402
from mmformer.compress.quantization import calibration_batches  # noqa: E402
from mmformer.ship import export  # noqa: E402
from mmformer.ship.onnx_runner import OnnxModel  # noqa: E402

TOLERANCE = {"static": 0.06, "dynamic": 0.03}
INT8_OPS = {"dynamic": {"DynamicQuantizeLinear", "MatMulInteger"}, "static": {"QuantizeLinear", "DequantizeLinear"}}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = tiny()
    return model, export.export(model, tmp_path_factory.mktemp("onnx") / "float", towers=["image", "decoder"])


def answers(runner: OnnxModel) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((3, 3, 16, 16)).astype(np.float32)
    embeds, states = runner._run("image_encoder", pixel_values=pixels)
    ids = runner.generate(states, np.ones(states.shape[:2], dtype=bool), max_new_tokens=5)
    return {"image": embeds, "ids": ids}


FRESH = """
import sys, numpy as np
sys.path.insert(0, {tests!r})
from test_quantization_onnx import answers
from mmformer.ship.onnx_runner import OnnxModel
np.savez({out!r}, **answers(OnnxModel({path!r})))
"""


@pytest.mark.parametrize("method", ["dynamic", "static"])
def test_onnxruntime_int8_is_close_and_runs_in_a_fresh_process(method, exported, manifest, tmp_path):  # noqa: F811
    import onnx

    model, source = exported
    calibration = calibration_batches(model, manifest, batch_size=4) if method == "static" else None
    path = quantize_export(source, tmp_path / method, method, model=model, calibration=calibration)
    config = json.loads((path / export.EXPORT_CONFIG).read_text())
    assert config["quantization"]["backend"] == "onnxruntime" and config["quantization"]["method"] == method
    for graph in config["graphs"].values():
        ops = {node.op_type for node in onnx.load(str(path / graph["file"])).graph.node}
        assert INT8_OPS[method] <= ops, (graph["file"], sorted(ops))
    expected, got = answers(OnnxModel(source)), answers(OnnxModel(path))
    diff = float(np.abs(got["image"] - expected["image"]).max())
    assert 0 < diff <= TOLERANCE[method], diff
    assert got["ids"].shape == expected["ids"].shape

    out = tmp_path / "fresh.npz"
    code = FRESH.format(tests=str(REPO / "tests"), path=str(path), out=str(out))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=cli_env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = np.load(out)
    for name, value in got.items():
        np.testing.assert_array_equal(fresh[name], value)


def test_onnxruntime_int8_refuses_other_providers_and_bad_requests(exported, tmp_path):
    model, source = exported
    path = quantize_export(source, tmp_path / "q", "dynamic")
    with pytest.raises(ValueError, match=r"int8 \(onnxruntime dynamic\), made for onnxruntime's CPUExecutionProvider; "
                                         r"got providers \['CUDAExecutionProvider'\]"):  # fmt: skip
        OnnxModel(path, providers=["CUDAExecutionProvider"])
    with pytest.raises(ValueError, match=r"supports \['dynamic', 'static'\], got 'int4'"):
        quantize_export(source, tmp_path / "x", "int4")
    with pytest.raises(ValueError, match="quantized already"):
        quantize_export(path, tmp_path / "x", "dynamic")
    with pytest.raises(ValueError, match="static int8 needs the float model and calibration batches"):
        quantize_export(source, tmp_path / "x", "static")
    with pytest.raises(FileNotFoundError, match="no export_config.json"):
        quantize_export(tmp_path / "nowhere", tmp_path / "x")
    assert not (tmp_path / "x").exists()
