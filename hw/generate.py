"""RTL generation: an overlay configuration in, Verilog and a manifest out.

:func:`generate` converts each distinct hardware module of an overlay once (today: the compute
tile, ``tw_tile``; every tile of the array is an instance of it) with
:func:`amaranth.back.verilog.convert`, and writes ``manifest.json`` describing what was
generated: the configuration, the modules with their parameters, the tile's ports and the
memory map. The manifest is what downstream tools (the Verilator harness build, the CLI,
benchmarks) read instead of re-deriving numbers.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from amaranth.back import verilog
from amaranth.hdl import Shape
from amaranth.lib import wiring

from .config import OverlayConfig, TileConfig
from .tile import tile_ports

__all__ = [
    "MANIFEST_VERSION",
    "TILE_MODULE",
    "expected_tile_ports",
    "generate",
    "generate_overlay",
    "overlay_modules",
    "verilog_ports",
]

#: Verilog module name of the compute tile.
TILE_MODULE = "tw_tile"
#: Bumped whenever the manifest layout changes incompatibly.
MANIFEST_VERSION = 1

TileFactory = Callable[[TileConfig], wiring.Component]


def expected_tile_ports(tile: TileConfig) -> dict[str, tuple[str, int]]:
    """The port contract of ``tw_tile``: name -> (direction, width).

    The Verilator harness (``sim/harness/tile_harness.sv``) connects exactly these ports.
    ``clk`` and ``rst`` are added by Amaranth.
    """
    ports = {"clk": ("in", 1), "rst": ("in", 1)}
    for name, member in tile_ports(tile).items():
        ports[name] = (member.flow.value.lower(), Shape.cast(member.shape).width)
    return ports


_PORT_RE = re.compile(r"^\s*(input|output|inout)\s+(?:wire\s+|reg\s+)?(?:\[(\d+):(\d+)\]\s+)?"
                      r"(\\?[\w$]+)\s*;", re.MULTILINE)


def verilog_ports(text: str, module: str) -> dict[str, tuple[str, int]]:
    """The ports of ``module`` in Verilog ``text`` as written by Yosys: name -> (dir, width).

    Raises
    ------
    ValueError
        If ``module`` is not defined in ``text``.
    """
    m = re.search(rf"^module\s+\\?{re.escape(module)}\s*\(([^)]*)\)\s*;", text, re.MULTILINE)
    if m is None:
        raise ValueError(f"module '{module}' is not defined in the generated Verilog")
    end = text.find("\nendmodule", m.end())
    body = text[m.end():end if end >= 0 else len(text)]
    decl: dict[str, tuple[str, int]] = {}
    for d, hi, lo, name in _PORT_RE.findall(body):
        width = abs(int(hi) - int(lo)) + 1 if hi else 1
        decl[name.lstrip("\\")] = ({"input": "in", "output": "out"}.get(d, d), width)
    order = [n.strip().lstrip("\\") for n in m.group(1).split(",") if n.strip()]
    return {n: decl[n] for n in order if n in decl}


def _check_ports(got: dict[str, tuple[str, int]], tile: TileConfig, who: str) -> None:
    want = expected_tile_ports(tile)
    problems = []
    for name, (d, w) in want.items():
        if name not in got:
            problems.append(f"missing port '{name}' ({d}, {w} bits)")
        elif got[name] != (d, w):
            problems.append(f"port '{name}' is {got[name][0]} {got[name][1]} bits, "
                            f"expected {d} {w} bits")
    for name in got.keys() - want.keys():
        problems.append(f"unexpected port '{name}'")
    if problems:
        raise ValueError(f"{who} does not match the tile port contract "
                         f"(tilewright.hw.generate.expected_tile_ports): " + "; ".join(problems))


def _default_tile_factory() -> TileFactory:
    from .tile import ComputeTile  # imported late: the RTL is the heavy part of the package

    return ComputeTile


def _factory_name(factory: TileFactory) -> str:
    return f"{getattr(factory, '__module__', '?')}.{getattr(factory, '__qualname__', factory)}"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def generate(cfg: OverlayConfig, outdir: str | os.PathLike[str], *,
             tile_factory: TileFactory | None = None) -> dict[str, Any]:
    """Generate the overlay's Verilog and manifest into ``outdir``.

    Parameters
    ----------
    cfg : OverlayConfig
        The overlay configuration.
    outdir : path-like
        Output directory; created if missing. Existing files of the same names are replaced.
    tile_factory : callable, optional
        Builds the tile component from a :class:`TileConfig`; default
        :class:`tilewright.hw.tile.ComputeTile`. Tests pass a stand-in with the same ports.

    Returns
    -------
    dict
        The manifest, as also written to ``outdir/manifest.json``. Keys: ``manifest_version``,
        ``config`` (name, digest, source, clock_mhz, array), ``top``, ``modules`` (one entry
        per distinct module: name, file, generator, instances, parameters, bytes, generate_s),
        ``ports`` (list of {name, dir, width} of ``tw_tile``), ``memory_map``,
        ``macs_per_cycle``, ``acc_depth``, ``clock_mhz``, ``peak_gmac_per_s``, ``files``.

    Raises
    ------
    TypeError
        If ``cfg`` is not an :class:`OverlayConfig`.
    ValueError
        If the generated tile's ports do not match :func:`expected_tile_ports`.
    """
    if not isinstance(cfg, OverlayConfig):
        raise TypeError(f"cfg must be an OverlayConfig (see tilewright.hw.config.load_config), "
                        f"not {cfg!r}")
    factory = tile_factory if tile_factory is not None else _default_tile_factory()
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    t = cfg.tile

    # One distinct module: every tile of the array is an instance of tw_tile.
    t0 = time.perf_counter()
    component = factory(t)
    text = verilog.convert(component, name=TILE_MODULE, emit_src=False)
    gen_s = time.perf_counter() - t0
    ports = verilog_ports(text, TILE_MODULE)
    _check_ports(ports, t, f"the Verilog of {_factory_name(factory)}")
    vfile = f"{TILE_MODULE}.v"
    _write_text(out / vfile, text)

    n_tiles = cfg.array.rows * cfg.array.cols
    manifest: dict[str, Any] = {
        "manifest_version": MANIFEST_VERSION,
        "config": {
            "name": cfg.name,
            "digest": cfg.digest(),
            "source": cfg.source,
            "clock_mhz": cfg.clock_mhz,
            "array": asdict(cfg.array),
        },
        "top": TILE_MODULE,
        "modules": [{
            "name": TILE_MODULE,
            "file": vfile,
            "generator": _factory_name(factory),
            "instances": n_tiles,
            "parameters": asdict(t),
            "bytes": len(text.encode()),
            "generate_s": round(gen_s, 3),
        }],
        "ports": [{"name": n, "dir": d, "width": w} for n, (d, w) in ports.items()],
        "memory_map": {
            "dmem_bytes": t.dmem_bytes,
            "dmem_words": t.dmem_words,
            "dmem_banks": t.dmem_banks,
            "bank_depth": t.bank_depth,
            "word_bytes": t.word_bytes,
            "word_bits": t.word_bits,
            "addr_bits": t.addr_bits,
            "qrec_words": t.qrec_words,
            "pmem_words": t.pmem_words,
            "instr_bits": 64,
            "pc_bits": t.pc_bits,
        },
        "macs_per_cycle": t.macs_per_cycle,
        "acc_depth": t.acc_depth,
        "clock_mhz": cfg.clock_mhz,
        "peak_gmac_per_s": t.macs_per_cycle * n_tiles * cfg.clock_mhz / 1000.0,
        "files": [vfile, "manifest.json"],
    }
    _write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def overlay_modules(cfg: OverlayConfig) -> dict[str, Callable[[], wiring.Component]]:
    """The distinct modules of ``cfg``'s overlay, each converted once: Verilog module name ->
    factory. The top (``tw_overlay``) instantiates the tile unit, the shim and the memtile by
    name."""
    from .memtile import Memtile
    from .overlay import (
        MEMTILE_MODULE,
        SHIM_MODULE,
        TILEUNIT_MODULE,
        TOP_MODULE,
        Overlay,
        array_memtile,
        memtile_act_channels,
    )
    from .shim import Shim
    from .tileunit import TileUnit

    return {
        TILEUNIT_MODULE: lambda: TileUnit(cfg.tile),
        SHIM_MODULE: lambda: Shim(cfg),
        MEMTILE_MODULE: lambda: Memtile(array_memtile(cfg), cfg.tile.block,
                                        unlocked=memtile_act_channels(cfg)),
        TOP_MODULE: lambda: Overlay(cfg),
    }


def _convert_overlay_module(cfg: OverlayConfig, name: str) -> tuple[str, float]:
    """Convert overlay module ``name`` of ``cfg`` (a pool worker's task): Verilog, seconds."""
    t0 = time.perf_counter()
    text = verilog.convert(overlay_modules(cfg)[name](), name=name, emit_src=False)
    return text, time.perf_counter() - t0


def generate_overlay(cfg: OverlayConfig, outdir: str | os.PathLike[str], *,
                     pool: Executor | None = None) -> dict[str, Any]:
    """Generate the whole overlay of ``cfg`` into ``outdir``: ``tw_tileunit.v``, ``tw_shim.v``,
    ``tw_memtile.v`` and the top ``tw_overlay.v`` (each distinct module converted once; the top
    instantiates ``rows x cols`` tile units, ``cols`` shims and ``cols`` memtiles) and
    ``overlay_manifest.json``.

    The modules are converted in parallel, one process per CPU (or on ``pool``, a process
    pool the caller shares with other work): aie2-8x8's four take 36 s one after the other.

    Returns the manifest: ``config``, ``top``, ``modules`` (name, file, instances, bytes,
    generate_s: each module's own conversion time), ``array``, ``ddr``, ``memtile`` (as
    generated: the channels the array wires), ``route_fields``, ``units`` (control-plane unit
    numbers), ``generate_s`` (wall clock).
    """
    from .overlay import TOP_MODULE, array_memtile, route_fields

    if not isinstance(cfg, OverlayConfig):
        raise TypeError(f"cfg must be an OverlayConfig (see tilewright.hw.config.load_config), "
                        f"not {cfg!r}")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    R, C = cfg.array.rows, cfg.array.cols
    instances = {TOP_MODULE: 1, "tw_tileunit": R * C, "tw_shim": C, "tw_memtile": C}
    mods = []
    t_all = time.perf_counter()
    names = list(overlay_modules(cfg))
    own = pool is None and (os.cpu_count() or 1) > 1
    if own:
        pool = ProcessPoolExecutor(min(len(names), os.cpu_count() or 1))
    try:
        if pool is None:
            done = [_convert_overlay_module(cfg, name) for name in names]
        else:
            done = [f.result() for f in [pool.submit(_convert_overlay_module, cfg, name)
                                         for name in names]]
    finally:
        if own and pool is not None:
            pool.shutdown()
    for name, (text, secs) in zip(names, done, strict=True):
        _write_text(out / f"{name}.v", text)
        mods.append({"name": name, "file": f"{name}.v", "instances": instances[name],
                     "bytes": len(text.encode()), "generate_s": round(secs, 3)})
    rf = route_fields(cfg)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "config": {"name": cfg.name, "digest": cfg.digest(), "source": cfg.source,
                   "clock_mhz": cfg.clock_mhz},
        "top": TOP_MODULE,
        "modules": mods,
        "array": asdict(cfg.array),
        "tile": asdict(cfg.tile),
        "ddr": asdict(cfg.ddr),
        "memtile": asdict(array_memtile(cfg)),
        "route_fields": {"len": [0, 15], "col": rf.col, "row": rf.row, "mt": rf.mt,
                         "tile": rf.tile, "cols": rf.cols},
        "units": {"tile": [0, R * C - 1], "shim": [R * C, R * C + C - 1],
                  "memtile": [R * C + C, R * C + 2 * C - 1]},
        "macs_per_cycle": cfg.tile.macs_per_cycle * R * C,
        "generate_s": round(time.perf_counter() - t_all, 3),
        "files": [m["file"] for m in mods] + ["overlay_manifest.json"],
    }
    _write_text(out / "overlay_manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest
