"""Overlay configuration: the single source of truth.

Every width and size used by the RTL generator, the assembler, the compiler, the golden model
and the tests is derived from an :class:`OverlayConfig`, loaded from a YAML file in
``overlay_configs/``. The schema is documented in ``docs/config.md``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

__all__ = ["ArrayConfig", "ConfigError", "DdrConfig", "MemtileConfig", "OverlayConfig",
           "TileConfig", "load_config"]


class ConfigError(ValueError):
    """A configuration file or value is invalid. The message names the file, the field, the
    bad value and what would be accepted."""


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class TileConfig:
    """Parameters of one compute tile.

    Attributes
    ----------
    pixels : int
        Output pixels computed per MAC cycle (the pixel lanes).
    block : int
        Block size ``b``: weight blocks are ``b`` output x ``b`` input channels, and a data
        memory word holds ``b`` int8 channels of one pixel.
    dmem_bytes : int
        Data memory size in bytes.
    dmem_banks : int
        Number of data memory banks.
    pmem_words : int
        Program memory size in 64-bit instruction words.
    acc_depth : int
        Pixel groups held by one of the two accumulator buffers (the chunk size).
    bds_per_channel : int
        Buffer descriptors per DMA channel of the tile unit (AIE-ML: 16). The overlay has no
        run-time BD reprogramming, so a run's whole schedule must fit: a weight channel takes
        one BD per chunk, an output channel one per output group.
    """

    pixels: int = 4
    block: int = 8
    dmem_bytes: int = 65536
    dmem_banks: int = 8
    pmem_words: int = 2048
    acc_depth: int = 32
    bds_per_channel: int = 16

    # Derived quantities -------------------------------------------------------------------
    @property
    def macs_per_cycle(self) -> int:
        return self.pixels * self.block * self.block

    @property
    def word_bytes(self) -> int:
        return self.block

    @property
    def word_bits(self) -> int:
        return 8 * self.block

    @property
    def dmem_words(self) -> int:
        return self.dmem_bytes // self.block

    @property
    def bank_depth(self) -> int:
        return self.dmem_words // self.dmem_banks

    @property
    def qrec_words(self) -> int:
        """Words of one requantisation record (bias[b] + multiplier[b], int32 each)."""
        return 8

    @property
    def addr_bits(self) -> int:
        return (self.dmem_words - 1).bit_length()

    @property
    def pc_bits(self) -> int:
        return (self.pmem_words - 1).bit_length()


@dataclass(frozen=True)
class MemtileConfig:
    """One column's memtile: staging memory with multi-channel 4-D DMA (AIE-ML: 512 KB,
    6 S2MM + 6 MM2S channels, 48 BDs, 64 locks).

    Attributes
    ----------
    bytes : int
        Memory size.
    banks : int
        Memory banks; each serves one access per cycle.
    s2mm, mm2s : int
        Stream-to-memory and memory-to-stream channels.
    bds_per_channel : int
        Buffer descriptors per channel.
    locks : int
        Locks of the memtile's lock unit.
    """

    bytes: int = 524288
    banks: int = 16
    s2mm: int = 6
    mm2s: int = 6
    bds_per_channel: int = 8
    locks: int = 64


@dataclass(frozen=True)
class DdrConfig:
    """The DDR ports of one column (per memtile), as the simulation's DDR model times them.

    Attributes
    ----------
    read_channels, write_channels : int
        Channels per column.
    bytes_per_cycle : int
        Bandwidth of one channel (4 B/cycle = 4 GB/s at 1 GHz).
    latency : int
        Cycles from a read request to its first data (paid again when a read channel resumes
        after a pause; see docs/architecture.md, "DDR model").
    bds_per_channel : int
        Buffer descriptors per shim read channel.
    read_fifo_words : int
        Words of each shim read channel's FIFO: a channel keeps reading DDR ahead while its
        packets wait for a bus another channel holds, then sends them a word per cycle.
    """

    read_channels: int = 2
    write_channels: int = 2
    bytes_per_cycle: int = 4
    latency: int = 64
    bds_per_channel: int = 16
    read_fifo_words: int = 256


@dataclass(frozen=True)
class ArrayConfig:
    """Shape of the tile array: ``rows`` x ``cols`` tile units, a memtile and a shim (DDR
    ports) per column."""

    rows: int = 1
    cols: int = 1


@dataclass(frozen=True)
class OverlayConfig:
    """A whole overlay configuration as loaded from YAML."""

    name: str
    clock_mhz: float = 1000.0
    array: ArrayConfig = field(default_factory=ArrayConfig)
    tile: TileConfig = field(default_factory=TileConfig)
    memtile: MemtileConfig = field(default_factory=MemtileConfig)
    ddr: DdrConfig = field(default_factory=DdrConfig)
    source: str = "<memory>"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source")
        return d

    @property
    def ddr_interval(self) -> int:
        """Cycles a DDR channel takes per tile word (``word_bytes / bytes_per_cycle``, at
        least 1): the pace of the DDR model in the RTL harness, the overlay model and the
        compiler's estimates."""
        return max(1, self.tile.word_bytes // self.ddr.bytes_per_cycle)

    def digest(self) -> str:
        """Stable hash of every field that affects generated hardware (for build caches)."""
        blob = json.dumps({"array": asdict(self.array), "tile": asdict(self.tile),
                           "memtile": asdict(self.memtile), "ddr": asdict(self.ddr)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Validation ---------------------------------------------------------------------------------

_TILE_RULES: dict[str, tuple[str, Any]] = {
    "pixels": ("a power of two from 1 to 16", lambda v: _is_pow2(v) and v <= 16),
    "block": ("one of 4, 8, 16", lambda v: v in (4, 8, 16)),
    "dmem_bytes": ("a power of two from 1024 to 1048576",
                   lambda v: _is_pow2(v) and 1024 <= v <= 1 << 20),
    "dmem_banks": ("a power of two from 8 to 64", lambda v: _is_pow2(v) and 8 <= v <= 64),
    "pmem_words": ("a power of two from 64 to 65536",
                   lambda v: _is_pow2(v) and 64 <= v <= 65536),
    "acc_depth": ("an integer from 1 to 1024", lambda v: 1 <= v <= 1024),
    "bds_per_channel": ("an integer from 1 to 64", lambda v: 1 <= v <= 64),
}
_MEMTILE_RULES: dict[str, tuple[str, Any]] = {
    "bytes": ("a power of two from 4096 to 4194304",
              lambda v: _is_pow2(v) and 4096 <= v <= 1 << 22),
    "banks": ("a power of two from 1 to 64", lambda v: _is_pow2(v) and v <= 64),
    "s2mm": ("an integer from 1 to 8", lambda v: 1 <= v <= 8),
    "mm2s": ("an integer from 1 to 8", lambda v: 1 <= v <= 8),
    "bds_per_channel": ("an integer from 1 to 64", lambda v: 1 <= v <= 64),
    "locks": ("an integer from 1 to 64", lambda v: 1 <= v <= 64),
}
_DDR_RULES: dict[str, tuple[str, Any]] = {
    "read_channels": ("an integer from 1 to 8", lambda v: 1 <= v <= 8),
    "write_channels": ("an integer from 1 to 8", lambda v: 1 <= v <= 8),
    "bytes_per_cycle": ("a power of two from 1 to 64", lambda v: _is_pow2(v) and v <= 64),
    "latency": ("an integer from 0 to 4096", lambda v: 0 <= v <= 4096),
    "bds_per_channel": ("an integer from 1 to 64", lambda v: 1 <= v <= 64),
    "read_fifo_words": ("an integer from 4 to 4096", lambda v: 4 <= v <= 4096),
}
_ARRAY_RULES: dict[str, tuple[str, Any]] = {
    "rows": ("an integer from 1 to 16", lambda v: 1 <= v <= 16),
    "cols": ("an integer from 1 to 16", lambda v: 1 <= v <= 16),
}


def _check_section(src: str, section: str, raw: Any, cls: type, rules: dict) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: '{section}' must be a mapping, not {raw!r}")
    known = {f.name for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{src}: unknown key '{section}.{key}'; "
                              f"accepted keys are {sorted(known)}")
    for key, value in raw.items():
        accepted, ok = rules[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{src}: '{section}.{key}' must be {accepted}, not {value!r} "
                              f"({type(value).__name__})")
        if not ok(value):
            raise ConfigError(f"{src}: '{section}.{key}' must be {accepted}, not {value!r}")
    return cls(**raw)


def _check_tile(src: str, t: TileConfig) -> None:
    if t.dmem_banks < t.block:
        raise ConfigError(f"{src}: 'tile.dmem_banks' = {t.dmem_banks} must be at least "
                          f"'tile.block' = {t.block} (a weight line reads one word per bank)")
    if t.dmem_banks < 2 * t.pixels:
        raise ConfigError(f"{src}: 'tile.dmem_banks' = {t.dmem_banks} must be at least "
                          f"2 x 'tile.pixels' = {2 * t.pixels} (stride-2 lanes must hit "
                          f"distinct banks)")
    if t.dmem_words % t.dmem_banks:
        raise ConfigError(f"{src}: 'tile.dmem_bytes' = {t.dmem_bytes} is not a whole number of "
                          f"rows of {t.dmem_banks} banks x {t.block}-byte words")
    # The tile must hold at least one 3x3 block row: 9 weight lines, a requantisation record,
    # a 3-row input window one pixel group (+ halo) wide and one output group.
    need = (9 * t.block + t.qrec_words + 3 * (t.pixels + 2) + t.pixels) * t.block
    if t.dmem_bytes < need:
        raise ConfigError(f"{src}: 'tile.dmem_bytes' = {t.dmem_bytes} is too small for the "
                          f"buffers of one 3x3 block row ({need} bytes); accepted: a power of "
                          f"two of at least {need}")
    if t.dmem_words > 1 << 16:
        raise ConfigError(f"{src}: 'tile.dmem_bytes' = {t.dmem_bytes} gives more than 65536 "
                          f"words, beyond the 16-bit address fields of the ISA")


def config_from_dict(raw: Any, source: str = "<memory>") -> OverlayConfig:
    """Validate a parsed YAML mapping and build an :class:`OverlayConfig`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the file must hold a mapping at top level, not {raw!r}")
    top = {"name", "clock_mhz", "array", "tile", "memtile", "ddr", "description"}
    for key in raw:
        if key not in top:
            raise ConfigError(f"{source}: unknown key '{key}'; accepted keys are {sorted(top)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: 'name' must be a non-empty string, not {name!r}")
    clock = raw.get("clock_mhz", 1000.0)
    if isinstance(clock, bool) or not isinstance(clock, (int, float)) or not 1 <= clock <= 5000:
        raise ConfigError(f"{source}: 'clock_mhz' must be a number from 1 to 5000, "
                          f"not {clock!r}")
    desc = raw.get("description", "")
    if not isinstance(desc, str):
        raise ConfigError(f"{source}: 'description' must be a string, not {desc!r}")
    array = _check_section(source, "array", raw.get("array"), ArrayConfig, _ARRAY_RULES)
    tile = _check_section(source, "tile", raw.get("tile"), TileConfig, _TILE_RULES)
    _check_tile(source, tile)
    # packet headers carry a column-bus bit, a row-bus mask, a memtile bit, a tile-row mask
    # and a column mask above the length (tilewright.hw.overlay.RouteFields)
    if 18 + 2 * array.rows + array.cols > tile.word_bits:
        raise ConfigError(f"{source}: a {array.rows}x{array.cols} array needs packet headers "
                          f"of {18 + 2 * array.rows + array.cols} bits (18 + 2 x rows + cols), "
                          f"more than the {tile.word_bits}-bit words of {tile.block}-byte "
                          f"blocks")
    memtile = _check_section(source, "memtile", raw.get("memtile"), MemtileConfig,
                             _MEMTILE_RULES)
    ddr = _check_section(source, "ddr", raw.get("ddr"), DdrConfig, _DDR_RULES)
    return OverlayConfig(name=name, clock_mhz=float(clock), array=array, tile=tile,
                         memtile=memtile, ddr=ddr, source=source)


def load_config(path: str | Path) -> OverlayConfig:
    """Load and validate an overlay configuration file.

    Raises
    ------
    ConfigError
        If the file is missing, is not YAML, or any field is invalid.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such configuration file")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    return config_from_dict(raw, str(p))
