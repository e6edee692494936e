"""RTL generation (tilewright.hw.generate) and the ``tilewright generate`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from amaranth.lib.wiring import Out
from stand_in_tile import StandInTile

from tilewright.hw.config import load_config
from tilewright.hw.generate import expected_tile_ports, generate, verilog_ports
from tilewright.sw.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "overlay_configs"

# name -> (memory map, macs_per_cycle, acc_depth)
EXPECTED = {
    "aie2-1x1": (dict(dmem_bytes=65536, dmem_words=8192, dmem_banks=8, bank_depth=1024,
                      word_bytes=8, word_bits=64, addr_bits=13, qrec_words=8, pmem_words=2048,
                      instr_bits=64, pc_bits=11), 256, 32),
    "tiny-1x1": (dict(dmem_bytes=16384, dmem_words=4096, dmem_banks=8, bank_depth=512,
                      word_bytes=4, word_bits=32, addr_bits=12, qrec_words=8, pmem_words=1024,
                      instr_bits=64, pc_bits=10), 32, 8),
}


def _check_manifest(m: dict, name: str, out: Path) -> None:
    mmap, macs, acc = EXPECTED[name]
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert m["config"]["name"] == name
    assert m["config"]["digest"] == cfg.digest()
    assert m["memory_map"] == mmap
    assert m["macs_per_cycle"] == macs
    assert m["acc_depth"] == acc
    assert m["clock_mhz"] == 1000.0
    assert m["peak_gmac_per_s"] == macs
    assert m["top"] == "tw_tile"
    assert len(m["modules"]) == 1  # every tile is an instance of one module
    mod = m["modules"][0]
    assert (mod["name"], mod["file"], mod["instances"]) == ("tw_tile", "tw_tile.v", 1)
    assert mod["parameters"] == {"pixels": cfg.tile.pixels, "block": cfg.tile.block,
                                 "dmem_bytes": mmap["dmem_bytes"],
                                 "dmem_banks": mmap["dmem_banks"],
                                 "pmem_words": mmap["pmem_words"], "acc_depth": acc,
                                 "bds_per_channel": cfg.tile.bds_per_channel}
    ports = {p["name"]: (p["dir"], p["width"]) for p in m["ports"]}
    assert ports == expected_tile_ports(cfg.tile)
    assert ports["dm_rdata"] == ("out", mmap["word_bits"])
    assert ports["dm_addr"] == ("in", mmap["addr_bits"])
    assert ports["error_pc"] == ("out", mmap["pc_bits"])
    assert json.loads((out / "manifest.json").read_text()) == m
    text = (out / "tw_tile.v").read_text()
    assert text.count("\nmodule tw_tile(") == 1
    assert verilog_ports(text, "tw_tile") == {k: tuple(v) for k, v in ports.items()}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_stand_in(name: str, tmp_path: Path) -> None:
    m = generate(load_config(CONFIGS / f"{name}.yaml"), tmp_path, tile_factory=StandInTile)
    _check_manifest(m, name, tmp_path)
    assert m["modules"][0]["generator"].endswith("StandInTile")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_manifest_compute_tile(name: str, tmp_path: Path) -> None:
    pytest.importorskip("tilewright.hw.tile", reason="hw/tile.py (ComputeTile) not there yet")
    m = generate(load_config(CONFIGS / f"{name}.yaml"), tmp_path)
    _check_manifest(m, name, tmp_path)
    assert m["modules"][0]["generator"] == "tilewright.hw.tile.ComputeTile"


class _NarrowCyclesTile(StandInTile):
    """Breaks the port contract: ``cycles`` is 16 bits wide instead of 32."""

    @classmethod
    def members(cls, tile):
        return {**super().members(tile), "cycles": Out(16)}


def test_port_contract_violation(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny-1x1.yaml")
    with pytest.raises(ValueError, match=r"port 'cycles' is out 16 bits, expected out 32 bits"):
        generate(cfg, tmp_path, tile_factory=_NarrowCyclesTile)


def test_generate_rejects_non_config(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="cfg must be an OverlayConfig"):
        generate({"name": "x"}, tmp_path)  # type: ignore[arg-type]


# CLI ------------------------------------------------------------------------------------------

def _generate_stand_in(cfg, out):
    """``generate`` with the stand-in tile (at module level: the CLI runs it in a worker
    process)."""
    return generate(cfg, out, tile_factory=StandInTile)


def test_cli_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                      monkeypatch: pytest.MonkeyPatch) -> None:
    import tilewright.hw.generate as gen

    monkeypatch.setattr(gen, "generate", _generate_stand_in)
    assert main(["generate", "tiny-1x1", "-o", str(tmp_path / "out")]) == 0
    text = capsys.readouterr().out
    assert "tiny-1x1" in text and "32 MAC/cycle" in text
    assert f"wrote {tmp_path / 'out' / 'tw_tile.v'}" in text
    assert (tmp_path / "out" / "manifest.json").is_file()
    # the whole overlay: tile unit and shim generated once each, the top instantiating them
    assert "tw_tileunit: 1 instance(s), generated once" in text
    assert (tmp_path / "out" / "tw_overlay.v").is_file()
    assert "done in" in text


def test_cli_config_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "no-such-config", "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no-such-config: no such configuration file")
    assert "aie2-1x1" in err and "tiny-1x1" in err and "Traceback" not in err

    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntile: {pixels: 3}\n")
    assert main(["generate", str(bad), "-o", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {bad}: 'tile.pixels' must be a power of two")
    assert not (tmp_path / "o").exists()


def test_cli_usage(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "generate" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
