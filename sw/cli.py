"""The ``tilewright`` command line.

Each subcommand is one function decorated with :func:`command`, which registers its name,
help text and argument setup in :data:`COMMANDS`; :func:`main` builds the parser from that
registry. Adding a subcommand::

    def _bench_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("config", help=CONFIG_HELP)

    @command("bench", "run the benchmark suite", _bench_args)
    def cmd_bench(args: argparse.Namespace) -> int:
        cfg = load_config_arg(args.config)
        ...
        return 0

A :class:`~tilewright.hw.config.ConfigError` raised by any command is printed as
``error: <message>`` and the exit status is 2 (as argparse does for bad usage).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tilewright.hw.config import ConfigError, OverlayConfig, load_config

if TYPE_CHECKING:
    from tilewright.sw.netcompile import CompiledNetwork

__all__ = ["COMMANDS", "CONFIG_HELP", "Command", "command", "config_dir", "load_config_arg",
           "main"]

CONFIG_HELP = ("overlay configuration: a YAML file, or the name of one in overlay_configs/ "
               "(e.g. aie2-1x1)")


@dataclass(frozen=True)
class Command:
    """One subcommand: ``configure`` adds its arguments, ``run`` returns the exit status."""

    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: The registered subcommands, in the order they are listed by ``--help``.
COMMANDS: dict[str, Command] = {}


def command(name: str, help: str,
            configure: Callable[[argparse.ArgumentParser], None] | None = None
            ) -> Callable[[Callable[[argparse.Namespace], int]],
                          Callable[[argparse.Namespace], int]]:
    """Register the decorated function as subcommand ``name``."""
    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in COMMANDS:
            raise ValueError(f"subcommand {name!r} is already registered")
        COMMANDS[name] = Command(name, help, configure or (lambda p: None), run)
        return run
    return register


def config_dir() -> Path:
    """The shipped ``overlay_configs/`` directory (of the source checkout)."""
    return Path(__file__).resolve().parent.parent / "overlay_configs"


def load_config_arg(arg: str) -> OverlayConfig:
    """Load a configuration given as a path or as the name of a shipped one.

    Raises
    ------
    ConfigError
        If ``arg`` is neither an existing file nor a shipped configuration name (the message
        lists the shipped names), or the file is invalid.
    """
    p = Path(arg)
    if p.is_file():
        return load_config(p)
    shipped = config_dir() / f"{arg}.yaml"
    if p.suffix not in (".yaml", ".yml") and shipped.is_file():
        return load_config(shipped)
    names = sorted(q.stem for q in config_dir().glob("*.yaml"))
    raise ConfigError(f"{arg}: no such configuration file; shipped configurations: "
                      f"{', '.join(names) if names else '(none found)'}")


def _human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1 << 20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / (1 << 20):.1f} MiB"


# generate -------------------------------------------------------------------------------------

def _generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("-o", "--output", required=True, type=Path, metavar="DIR",
                   help="output directory (created if missing)")
    p.add_argument("--tile-only", action="store_true",
                   help="only the compute tile (tw_tile.v, manifest.json), not the array")


@command("generate", "generate the overlay's Verilog and manifests", _generate_args)
def cmd_generate(args: argparse.Namespace) -> int:
    import os
    from concurrent.futures import ProcessPoolExecutor

    from tilewright.hw.generate import generate, generate_overlay

    cfg = load_config_arg(args.config)
    t0 = time.perf_counter()
    if args.tile_only:
        manifest, ov = generate(cfg, args.output), None
    else:
        # the tile and the overlay's modules converted side by side, a process per CPU
        with ProcessPoolExecutor(min(5, os.cpu_count() or 1)) as pool:
            tile = pool.submit(generate, cfg, args.output)
            ov = generate_overlay(cfg, args.output, pool=pool)
            manifest = tile.result()
    print(f"{cfg.name} ({cfg.source}, digest {cfg.digest()}): "
          f"{manifest['macs_per_cycle']} MAC/cycle x {manifest['modules'][0]['instances']} "
          f"tile(s) at {cfg.clock_mhz:g} MHz", flush=True)
    files = list(manifest["files"])
    if ov is not None:
        files += ov["files"]
        for m in ov["modules"]:
            print(f"  {m['name']}: {m['instances']} instance(s), generated once in "
                  f"{m['generate_s']} s")
    dt = time.perf_counter() - t0
    for name in files:
        f = args.output / name
        print(f"  wrote {f}  ({_human_bytes(f.stat().st_size)})")
    print(f"done in {dt:.1f} s")
    return 0


# bench ----------------------------------------------------------------------------------------

BENCH_TARGETS = ("tile", "layer")


def _bench_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", choices=BENCH_TARGETS,
                   help="tile: ResNet50 layer1.0.conv2 (3x3 64->64) on one tile, dense and "
                        "block-sparse, in Verilator; layer: one layer of a torchvision network "
                        "on the whole array, DDR to DDR, in Verilator")
    p.add_argument("config", help=CONFIG_HELP)
    p.add_argument("--sparsity", type=float, nargs="+", default=None, metavar="S",
                   help="block sparsities to run (tile: default 0 0.5 0.75, 0 included; "
                        "layer: default 0, one JSON object per value)")
    p.add_argument("--model", default="resnet50", choices=("resnet50", "inception_v3", "vgg16"),
                   help="layer: the torchvision network (default resnet50)")
    p.add_argument("--layer", default="layer3.1.conv2",
                   help="layer: the torchvision module path of a Conv2d, Linear, MaxPool2d, "
                        "AvgPool2d or AdaptiveAvgPool2d((1, 1)) layer (default layer3.1.conv2)")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, input and masks")
    p.add_argument("--no-rtl", action="store_true",
                   help="golden model only (no Verilator): cycles from the cycle model")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _print_bench(r: dict) -> None:
    w = r["window"]
    print(f"{r['layer']} on {r['config']} ({r['macs_per_cycle']} MAC/cycle), window "
          f"{w['rows']}x{w['cols']}x{w['out_channels']}")
    for s, c in r["cycles"].items():
        extra = ""
        if s != "0":
            key = f"speedup_{round(float(s) * 100)}"
            extra = f"  speed-up {r[key]:.3f} (target >= {r[key + '_target']:.3f})"
        print(f"  sparsity {float(s):4.2f}: {r['nnz_blocks'][s]:4d} blocks, {c:8d} cycles{extra}")
    print(f"  dense MAC utilisation {r['mac_utilization']:.2%}")
    if "sim_cycles_per_s" in r:
        print(f"  Verilator: {r['sim_cycles_per_s']:,} cycles/s, build "
              f"{r['verilator_build_s']} s{' (cached)' if r['verilator_build_cached'] else ''}"
              f", RTL cycles == golden model: {r['cycle_model_exact']}")
    print(f"  bit-exact against the PyTorch integer reference: {r['bit_exact']}")


def _print_bench_layer(r: dict) -> None:
    what = tuple(r["weight_shape"]) if "weight_shape" in r else f"{r['kind']} {r['kernel']}"
    print(f"{r['model']}.{r['layer']} {what} on {r['config']} "
          f"({r['peak_macs_per_cycle']} MAC/cycle), sparsity {r['sparsity']:g}, "
          f"{r['runs']} overlay run(s)")
    print(f"  cycles {r['cycles']:,} ({r['time_us']} us), MAC utilisation "
          f"{r['mac_utilization']:.2%} (issued / peak; dense-equivalent "
          f"{r['effective_mac_utilization']:.2%})")
    print(f"  DDR {r['ddr_bytes']:,} bytes, lower bound {r['ddr_bytes_min']:,} "
          f"(ratio {r['ddr_ratio']})")
    if "sim_cycles_per_s" in r:
        print(f"  Verilator: {r['sim_cycles_per_s']:,} cycles/s, build "
              f"{r['verilator_build_s']} s{' (cached)' if r['verilator_build_cached'] else ''}"
              f", generate {r['generate_s']} s; overlay model cycles {r['model_cycles']:,} "
              f"({r['model_vs_rtl_cycles']} of the RTL's)")
    print(f"  bit-exact against the PyTorch integer reference: {r['bit_exact']}")


@command("bench", "run a benchmark and print its figures", _bench_args)
def cmd_bench(args: argparse.Namespace) -> int:
    import json

    from tilewright.sim.bench import bench_layer, bench_tile

    cfg = load_config_arg(args.config)
    say = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.target == "layer":
        ok = True
        for s in args.sparsity or [0.0]:
            r = bench_layer(cfg, model=args.model, layer=args.layer, sparsity=s,
                            seed=args.seed, rtl=not args.no_rtl, progress=say)
            if args.json:
                print(json.dumps(r), flush=True)
            else:
                _print_bench_layer(r)
            ok = ok and r["bit_exact"]
        return 0 if ok else 1
    r = bench_tile(cfg, sparsities=args.sparsity or [0.0, 0.5, 0.75], seed=args.seed,
                   rtl=not args.no_rtl, progress=say)
    if args.json:
        print(json.dumps(r))
    else:
        _print_bench(r)
    return 0 if r["bit_exact"] else 1


# demo -----------------------------------------------------------------------------------------

def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", default="aie2-1x1",
                   help=CONFIG_HELP + " (default: aie2-1x1)")
    p.add_argument("-o", "--output", type=Path, default=Path("build/demo"), metavar="DIR",
                   help="where the generated RTL goes (default: build/demo)")


@command("demo", "generate a tile and co-simulate a block-sparse ResNet50 conv on it",
         _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    from tilewright.hw.generate import generate
    from tilewright.sim.bench import bench_tile

    cfg = load_config_arg(args.config)
    out = args.output / cfg.name
    print(f"[1/2] generating the {cfg.name} tile RTL into {out} ...", flush=True)
    t0 = time.perf_counter()
    m = generate(cfg, out)
    print(f"      {', '.join(m['files'])} in {time.perf_counter() - t0:.1f} s", flush=True)
    print("[2/2] co-simulating ResNet50 layer1.0.conv2 in Verilator, dense and 50 % "
          "block-sparse ...", flush=True)
    r = bench_tile(cfg, sparsities=(0.0, 0.5),
                   progress=lambda msg: print(f"      {msg}", flush=True))
    _print_bench(r)
    return 0 if r["bit_exact"] else 1


# compile / verify -------------------------------------------------------------------------------

MODEL_HELP = ("resnet50, inception_v3, vgg16 (torchvision, seeded initialisation) or an "
              "importable module:factory returning an nn.Module")


def _shape3(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W (e.g. 3,224,224), not {text!r}") \
            from None
    return c, h, w


def _net_args(p: argparse.ArgumentParser, verify: bool) -> None:
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--overlay", required=True, metavar="CONFIG", help=CONFIG_HELP)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--sparsity", type=float, default=0.0, metavar="S",
                     help="block sparsity given to every layer but the first conv (smallest "
                          "L2 blocks zeroed; default 0)")
    src.add_argument("--checkpoint", type=Path, metavar="FILE",
                     help="a trainer checkpoint: its masks and QAT scales (MODEL is then only "
                          "a label)")
    p.add_argument("--seed", type=int, default=0,
                   help="seeds the initialisation, calibration and test images (default 0)")
    p.add_argument("--calib", type=int, default=2, metavar="N",
                   help="calibration images for the activation scales (default 2)")
    p.add_argument("--input-shape", type=_shape3, metavar="C,H,W",
                   help="input shape of a module:factory model (default: its input_shape "
                        "attribute, else 3,224,224)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false",
                   help="run every residual add on its own instead of in the epilogue of the "
                        "conv that feeds it")
    p.add_argument("--no-prefetch", dest="prefetch", action="store_false",
                   help="every conv reads its weights from DDR in its own runs (default: a "
                        "layer's last run prefetches the next conv's weights into the memtiles "
                        "where its DDR channels have the time)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    if not verify:
        p.add_argument("-o", "--output", type=Path, metavar="DIR",
                       help="write the manifest, the DDR image and every run's configuration "
                            "records (programs, BDs, locks) here")


def _compile(args: argparse.Namespace, estimate: bool = True) -> CompiledNetwork:
    from tilewright.sw.netcompile import compile_network

    cfg = load_config_arg(args.overlay)
    return compile_network(args.model, cfg, sparsity=args.sparsity,
                           checkpoint=args.checkpoint, seed=args.seed, calib=args.calib,
                           input_shape=args.input_shape, estimate=estimate,
                           bar=sys.stderr.isatty(), fuse=args.fuse,
                           prefetch=args.prefetch)


def _net_errors(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Print a model that cannot be imported, quantised or compiled as ``error: ...`` (exit
    status 1) instead of a traceback."""
    def wrapped(args: argparse.Namespace) -> int:
        from tilewright.sw.graph import GraphError
        from tilewright.sw.netcompile import CompileError
        from tilewright.sw.ptq import QuantError

        try:
            return run(args)
        except (GraphError, CompileError, QuantError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
    return wrapped


@command("compile", "compile a PyTorch model to per-tile programs, datamover descriptors and a "
         "DDR image, with per-layer cycle and DDR estimates", lambda p: _net_args(p, False))
@_net_errors
def cmd_compile(args: argparse.Namespace) -> int:
    import json

    cn = _compile(args)
    if args.output is not None:
        cn.write(args.output)
    if args.json:
        print(json.dumps(cn.summary()))
    else:
        print(cn.table())
        if args.output is not None:
            print(f"wrote {args.output}/manifest.json, ddr.bin "
                  f"({cn.ddr_words * cn.cfg.tile.word_bytes / 1e6:.1f} MB) and "
                  f"{sum(cl.runs for cl in cn.layers)} run configurations under "
                  f"{args.output}/runs")
    return 0


@command("verify", "run every compiled layer of a model on the overlay's Python model and "
         "compare it with the integer PyTorch reference", lambda p: _net_args(p, True))
@_net_errors
def cmd_verify(args: argparse.Namespace) -> int:
    import json

    from tilewright.sw.netcompile import verify_network

    t0 = time.perf_counter()
    cn = _compile(args, estimate=False)
    if not args.json:
        print(f"{cn.model} on {cn.cfg.name}, sparsity {cn.sparsity}: {len(cn.layers)} layers "
              f"compiled in {cn.compile_s:.1f} s; running them on the overlay model ...",
              flush=True)

    def line(c) -> None:
        if not args.json:
            verdict = ("ok" if c.ok else f"ERROR ({c.error})" if c.error
                       else f"MISMATCH ({c.mismatches} values)")
            print(f"  {c.name:40s} {c.kind:15s} {c.cycles:10d} cycles  {verdict}", flush=True)

    checks, _ = verify_network(cn, seed=args.seed, progress=line, bar=sys.stderr.isatty())
    ok = all(c.ok for c in checks)
    bad = [c.name for c in checks if not c.ok]
    dt = time.perf_counter() - t0
    if args.json:
        print(json.dumps({"model": cn.model, "config": cn.cfg.name, "sparsity": cn.sparsity,
                          "layers": [c.__dict__ for c in checks], "pass": ok,
                          "mismatched_layers": bad, "cycles": sum(c.cycles for c in checks),
                          "wall_s": round(dt, 1)}))
    else:
        n = len(checks)
        stopped = next((c for c in checks if c.error), None)
        print(f"{'PASS' if ok else 'FAIL'}: {n - len(bad)} of {n} layers bit-exact with the "
              f"integer PyTorch reference ({dt:.1f} s)" + (f"; mismatched: {', '.join(bad)}"
                                                           if bad else "")
              + (f"; the overlay model stopped on {stopped.name}, the layers after it were "
                 f"not run" if stopped else ""))
    return 0 if ok else 1


# train / prune --------------------------------------------------------------------------------

def _train_args(p: argparse.ArgumentParser) -> None:
    from tilewright.sw.prune.options import add_train_args

    add_train_args(p)


@command("train", "train a network: dense, Dropback sparse training, or gradual pruning",
         _train_args)
def cmd_train(args: argparse.Namespace) -> int:
    from tilewright.sw.prune.commands import run_train

    return run_train(args)


def _prune_args(p: argparse.ArgumentParser) -> None:
    from tilewright.sw.prune.options import add_prune_args

    add_prune_args(p)


@command("prune", "prune a checkpoint to 8x8 blocks (or N:M, unstructured), fine-tune, "
         "measure int8", _prune_args)
def cmd_prune(args: argparse.Namespace) -> int:
    from tilewright.sw.prune.commands import run_prune

    return run_prune(args)


# main -----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="tilewright",
        description="Hardware/software co-design for weight-block-sparse DNN inference on "
                    "AIE-like FPGA overlays.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for c in COMMANDS.values():
        sp = sub.add_parser(c.name, help=c.help, description=c.help)
        c.configure(sp)
        sp.set_defaults(_run=c.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 2 usage or configuration error)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:  # no command: show what there is
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
