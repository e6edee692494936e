"""Overlay configuration loading and its errors."""

from pathlib import Path

import pytest

from tilewright.hw.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
GOOD = """name: t
clock_mhz: 1000
array: {rows: 1, cols: 1}
tile: {pixels: 4, block: 8, dmem_bytes: 65536, dmem_banks: 8, pmem_words: 2048, acc_depth: 32}
"""


@pytest.mark.parametrize("path", sorted((REPO / "overlay_configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.tile.macs_per_cycle == cfg.tile.pixels * cfg.tile.block ** 2


def test_reference_tile_numbers():
    t = load_config(REPO / "overlay_configs" / "aie2-1x1.yaml").tile
    assert (t.macs_per_cycle, t.dmem_bytes, t.block) == (256, 65536, 8)


def _load(tmp_path, text):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    return load_config(f)


@pytest.mark.parametrize("text, message", [
    (GOOD.replace("clock_mhz", "clok_mhz"), "unknown key 'clok_mhz'"),
    (GOOD.replace("pixels: 4", "pixels: 4, lanes: 3"), "unknown key 'tile.lanes'"),
    (GOOD.replace("block: 8", "block: '8'"), "'tile.block' must be one of 4, 8, 16, not '8'"),
    (GOOD.replace("block: 8", "block: 6"), "'tile.block' must be one of 4, 8, 16, not 6"),
    (GOOD.replace("dmem_bytes: 65536", "dmem_bytes: 60000"),
     "'tile.dmem_bytes' must be a power of two from 1024 to 1048576, not 60000"),
    (GOOD.replace("dmem_banks: 8", "dmem_banks: true"), "'tile.dmem_banks' must be"),
    (GOOD.replace("pixels: 4", "pixels: 8"), "must be at least 2 x 'tile.pixels' = 16"),
    (GOOD.replace("dmem_bytes: 65536", "dmem_bytes: 1024").replace("block: 8", "block: 16")
     .replace("dmem_banks: 8", "dmem_banks: 16").replace("pixels: 4", "pixels: 8"),
     "too small for the buffers"),
    (GOOD.replace("name: t", "name: 3"), "'name' must be a non-empty string"),
    ("- 1\n- 2\n", "must hold a mapping at top level"),
    (GOOD + "memtile: {bytes: 100000}\n",
     "'memtile.bytes' must be a power of two from 4096 to 4194304, not 100000"),
    (GOOD + "memtile: {dma: 3}\n", "unknown key 'memtile.dma'"),
    (GOOD + "ddr: {bytes_per_cycle: 3}\n", "'ddr.bytes_per_cycle' must be a power of two"),
    (GOOD + "ddr: {read_fifo_words: 2}\n",
     "'ddr.read_fifo_words' must be an integer from 4 to 4096, not 2"),
    ("name: [\n", "not valid YAML"),
])
def test_bad_configs_name_file_field_and_value(tmp_path, text, message):
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, text)
    assert message in str(e.value)
    assert "bad.yaml" in str(e.value)


def test_missing_file():
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config("/nonexistent/x.yaml")


def test_digest_depends_on_hardware_fields_only(tmp_path):
    a = _load(tmp_path, GOOD)
    b = _load(tmp_path, GOOD.replace("name: t", "name: other"))
    c = _load(tmp_path, GOOD.replace("acc_depth: 32", "acc_depth: 16"))
    assert a.digest() == b.digest() != c.digest()
