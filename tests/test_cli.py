"""The tilewright bench command (generate and usage are covered in test_generate.py)."""

import json

import pytest

from tilewright.sw.cli import main


def test_bad_config_file_names_field(tmp_path, capsys):
    f = tmp_path / "bad.yaml"
    f.write_text("name: x\ntile: {block: 7}\n")
    assert main(["bench", "tile", str(f), "--no-rtl"]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "'tile.block' must be one of 4, 8, 16, not 7" in err
    assert "Traceback" not in err


def test_bench_tile_golden_json(capsys):
    """The benchmark's figures on the cycle-exact golden model (no simulator)."""
    assert main(["bench", "tile", "aie2-1x1", "--no-rtl", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bit_exact"] is True
    assert r["window"] == {"rows": 2, "cols": 56, "out_channels": 64}
    # design targets of the tile (deterministic: cycles come from the exact cycle model)
    assert r["mac_utilization"] >= 0.95
    assert r["speedup_50"] >= r["speedup_50_target"]
    assert r["speedup_75"] >= r["speedup_75_target"]


@pytest.mark.verilator
def test_bench_tile_rtl_json(capsys):
    assert main(["bench", "tile", "tiny-1x1", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("mac_utilization", "speedup_50", "speedup_75", "bit_exact", "sim_cycles_per_s",
                "verilator_build_s", "cycle_model_exact"):
        assert key in r, key
    assert r["bit_exact"] is True and r["cycle_model_exact"] is True
    assert r["sim_cycles_per_s"] > 0


def test_bench_layer_pool_and_conv_model_json(capsys):
    """bench layer on the overlay model (no simulator): a torchvision pool module and the
    issue's conv layer, bit-exact, with the figures the issue asks for."""
    assert main(["bench", "layer", "aie2-2x2", "--model", "vgg16", "--layer", "features.30",
                 "--no-rtl", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["bit_exact"] is True and r["kind"] == "maxpool" and r["output_shape"] == [512, 7, 7]
    assert main(["bench", "layer", "aie2-2x2", "--model", "resnet50", "--layer", "layer4.1.conv2",
                 "--sparsity", "0.5", "--no-rtl", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for key in ("cycles", "mac_utilization", "ddr_bytes", "ddr_bytes_min", "bit_exact"):
        assert key in r, key
    assert r["bit_exact"] is True and r["ddr_bytes"] >= r["ddr_bytes_min"] * 0.95
