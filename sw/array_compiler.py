"""The array layer compiler: one convolution or linear layer across an overlay's tile array.

:func:`compile_conv_array` turns a quantised layer and its int8 input into
:class:`ArrayJob` s -- everything the overlay needs for one run from DDR to DDR: the DDR
image, per-tile programs, buffer descriptors, lock values and data-memory constants, and the
shim's descriptors and tasks -- plus the metadata the overlay model, the benchmark and the
estimator read. The dataflow (docs/architecture.md, "Running a layer on the array"):

* **Columns split output channels.** Block rows (output channel groups) are dealt to the
  columns Procrustes-style: sorted by non-zero blocks, densest first, each to the column with
  the least work so far, so that every column streams about the same number of non-zero
  blocks.
* **Tile rows split the output image.** Tile row ``r`` computes an output rectangle of every
  block row of its column (a grid of ``Rh x Rw = rows`` rectangles, chosen so that the
  largest holds the fewest pixel groups: a row of ``w`` pixels costs ``ceil(w / pixels)``
  groups); its input slice (the rectangle's input plus the halo, padded, every input channel
  group) is read from DDR once, padded on the fly by the shim's descriptors, and broadcast
  along the tile row (row bus ``r``) to the tiles of every column. The slice is cut by input
  channel groups into parts growing geometrically from one group, alternating between the two
  read channels of one column; each part's header carries its tile-memory address and the
  counting lock of its channel slot (:data:`ACT_LOCKS`), which the tile unit's activation
  writer releases when it has landed, so that the core starts on the first (small) part while
  the others stream in, and acquires each part just before its first block.
* **Weights stream down the columns.** A column's block rows are cut into chunks (several
  block rows: their requantisation records and non-zero weight lines, compacted -- a zero
  block never crosses DDR or a port). Chunk ``k`` goes into weight buffer ``k mod 2`` of
  every tile of the column (ping/pong, with locks, so that the next chunk streams in while the
  core computes on this one; small chunks first and last, see :func:`_chunks`); its first
  half travels on column bus 0 (read channel 0) and its second half on column bus 1 (read
  channel 1), one broadcast packet each, so both of the column's DDR channels stream every
  chunk. Each channel sends its activation parts and weight packets in the order the cores
  need them.
* **Outputs stream back.** After the ``k``-th chunk that completes block rows, the core of tile
  row ``r`` releases its output lock and MM2S channel ``(k + r) mod 2`` sends one packet per
  block row (a header with the DDR address, then the tile's rows of that channel group,
  contiguous in the DDR's channel-group-planar layout). Tile rows start on alternate channels,
  so a column's last outputs, finished by all its tiles at once, leave on both write channels.

* **A residual add may be fused** (:class:`FusedAdd`): the tiles add the residual operand
  (one row-bus packet per part, for the one tile that needs it) to the convolution's output
  in batches of block rows before sending them, so the convolution's output never crosses
  DDR; columns then take contiguous ranges of block rows.

When a layer does not fit in one run (input slice + two weight buffers + outputs larger than
the tile memory, or more chunks than buffer descriptors), it is split into several jobs over
block rows and/or output rows; each job is a separate overlay run.

DDR layout (words of ``tile.block`` bytes): the input as channel-group planes
``[Gin][H][W]`` at 0, the output ``[Gout][Ho][Wo]`` after it, then per job the packet
headers of the activation slices and the weight streams of every column and bus.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
from dataclasses import dataclass, field

import numpy as np

from tilewright.hw.bd import MAX_BDS, BufferDescriptor, LockAction
from tilewright.hw.config import OverlayConfig
from tilewright.hw.isa import INDEX_PER_WORD, Param, param_range
from tilewright.hw.locks import check_int
from tilewright.hw.overlay import CFG_KINDS, array_memtile, route_fields
from tilewright.hw.tileunit import N_S2MM
from tilewright.sw.asm import Program
from tilewright.sw.quantize import block_mask
from tilewright.sw.tile_compiler import AddLayer, ConvLayer, PoolLayer, output_shape

__all__ = [
    "LOCK_IN",
    "LOCK_OFULL",
    "LOCK_WEMPTY",
    "LOCK_WFULL",
    "ArrayJob",
    "ArrayLayer",
    "Chunk",
    "FusedAdd",
    "Placement",
    "SpaceToDepth",
    "TilePlan",
    "add_prefetch",
    "compile_conv_array",
    "memtile_end",
    "read_planes",
]

#: Tile locks of the array dataflow.
LOCK_IN = 0
#: ``LOCK_WFULL[buf][bus]`` / ``LOCK_WEMPTY[buf][bus]``: one full/empty pair per weight
#: buffer and column bus, so that a bus running ahead can never refill a buffer part the
#: core has not consumed yet.
LOCK_WFULL = ((1, 2), (3, 4))
LOCK_WEMPTY = ((5, 6), (7, 8))
LOCK_OFULL = (9, 10)
#: The locks of a tile row's activation parts: part ``i`` comes on the row's channel slot
#: ``i % slots`` and releases that slot's lock; as a slot's parts land in order, the lock
#: counts them, and the core acquires each part just before its first block needs it.
ACT_LOCKS = (LOCK_IN, 11, 12, 13, 14, 15)
#: Tile DMA channel numbers (``bd_ch``): S2MM 1/2 the weight buses, then MM2S (channel 0,
#: the activation writer, takes no BDs).
CH_W = (1, 2)
#: Memtile locks: a replayed weight stream of column bus ``j`` waits on ``MT_LOCKS[j]``.
MT_LOCKS = (0, 1)
CH_OUT = (N_S2MM, N_S2MM + 1)
#: What the run splitter charges for one more overlay run, in cycles, charged as the DDR
#: words the array's read channels move in them: its start-up (the DDR latency, the first
#: weight chunk and activation part before any tile computes) and its drain (the last
#: outputs after the cores stop), about 1.5 k cycles per run in the model's timelines
#: (1536: 6144 words on aie2-4x4; 512 cycles before, which split VGG16's features.2 at
#: 50 % into 112 runs of 5.1 k cycles instead of 22: 570 k against 481 k model cycles).
RUN_COST_CYCLES = 1536
#: Words of a column's first weight chunk when block rows may be cut into pieces (0: the first
#: chunk is one block row), and how much larger each next chunk may be.
RAMP_WORDS = 256
RAMP_GROWTH = 1.6
#: With the shrinking end, a chunk holds at most this share of the words left.
RAMP_DOWN = 0.6
#: A chunk's weights come in two halves (one per column bus); where the core may cut a CONV,
#: it starts on the blocks of the first half and acquires the second just before its first
#: block.  The second half's packet is then due later, by this share of the first half's
#: blocks (so that the activation parts in front of it on a channel go first).  Measured on
#: resnet50 layer3.1.conv2, aie2-4x4: 0.45 keeps dense cycles at 35 061 and 50 % at 19 333;
#: 0 costs dense 284 cycles, 1 costs 50 % 336 (docs/results.md).
W_HALF_SLACK = 0.45
#: What the chunker tries, in order (buffers, pieces, first chunk in RAMP_WORDS, shrinking at
#: the end): two weight buffers (ping/pong) with small chunks at both ends, at the start only,
#: whole block rows; then block rows in pieces; then one buffer (the next chunk then streams
#: in only after the core is done with this one).
_TIERS = ((2, True, 1, True), (2, True, 1, False), (2, True, 4, False), (2, False, 0, False),
          (2, True, 0, False), (1, False, 0, False), (1, True, 0, False))
#: The same where a tile's pixel groups do not fit the accumulators (no pieces).
_TIERS_WHOLE = ((2, False, 0, False), (1, False, 0, False))
#: Activation parts per read channel (each tile row's slice is cut into this many parts per
#: channel that carries it, as many as the shim's BDs allow). ResNet50 at 50 % on aie2-4x4
#: (64 shim BDs): 6 -> 1.594 ms, 10 -> 1.557, 16 -> 1.547, 24 -> 1.546.
ACT_PARTS_PER_CHANNEL = 16
#: Parts of a fused add's residual per tile at most (each is fetched before the ADDs of the
#: output batches it serves, so that the first outputs leave while the rest still streams in).
#: ResNet50 at 50 %: 4 -> 1.547 ms, 8 -> 1.506, 16 -> 1.506.
RES_PARTS = 8
#: (activation parts per channel, residual parts per tile) a fused layer tries, in order,
#: until the shim's BDs suffice.
_FUSED_TRIES = (*((n, q) for q in (RES_PARTS, 4, 2, 1)
                  for n in (ACT_PARTS_PER_CHANNEL, 8, 4, 2)), (1, 1))
#: ... and for a kernel of more than one tap, whose blocks take longer, so that the parts
#: need not come as soon (ResNet50 at 50 %: the 3x3 layers 0.1 to 2.6 % faster with 8
#: than with 16, the 1x1 layers 4 to 12 % slower; layer3.1.conv2 19 574 -> 19 172 cycles).
ACT_PARTS_KXK = 8
#: Activation parts per channel an unfused layer tries, in order.
_ACT_TRIES = tuple(n for n in (ACT_PARTS_PER_CHANNEL, 12, 8, 6, 4, 3, 2, 1)
                   if n <= ACT_PARTS_PER_CHANNEL)
#: Output batches of a fused add per tile at most (each costs about 20 instructions).
OUT_BATCHES = 8
#: Largest size of one BD dimension.
_DIM_MAX = (1 << 16) - 1


@functools.lru_cache(maxsize=1 << 16)
def _encode(bd: BufferDescriptor) -> int:
    """``bd.encode()``, cached: Amaranth's layout encoder takes ~1 ms a BD, and the tiles of a
    column (and the runs of a layer) repeat theirs."""
    return bd.encode()


def _check_out_words(cfg: OverlayConfig, name: str, out_base: int, out_words: int) -> None:
    """Outputs go to DDR words below the output header's memtile bit (``RouteFields.mw``)."""
    top = 1 << (route_fields(cfg).mw - 16)
    if out_base + out_words > top:
        raise ValueError(f"layer {name!r}: its output ends at DDR word {out_base + out_words}, "
                         f"beyond the {top} words a {cfg.tile.word_bits}-bit output header "
                         f"addresses on {cfg.name}")


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _align(a: int, n: int) -> int:
    return _cdiv(a, n) * n


class _TooMany(Exception):
    """More chunks than BDs (the chunker gives up early)."""


class _ShimBdsShort(ValueError):
    """A read channel's stream needs more BDs than the shim has."""


class _ProgramTooLong(ValueError):
    """A tile's program does not fit its program memory (fewer activation parts may)."""


@dataclass
class Chunk:
    """A run of consecutive block rows of one column's job (one weight packet).

    A block row too large for a weight buffer is cut into pieces (runs of its non-zero
    blocks) in consecutive chunks: CONV ``.hold`` on every piece but the last, ``.acc`` on
    every piece but the first, so its sums stay in the accumulators across the lock waits.
    """

    pieces: list[tuple[int, int, int]]   # (global block row, first block, end block)
    q_words: int                 # requantisation records (one per piece), padded
    w_words: int                 # weight lines
    first: int                   # index (among the column's job rows) of the first row that
    #                              completes in this chunk
    rows: list[int] = field(default_factory=list)   # the block rows completed in this chunk
    blk_words: int = 0           # words of one block's weight lines (0: unknown)

    @property
    def words(self) -> int:
        return self.q_words + self.w_words

    def parts(self, b: int) -> list[tuple[int, int]]:
        """``(offset, words)`` of the chunk's part on column bus 0 and, if any, bus 1: the
        first and second half, split at the block boundary nearest the middle (at a weight
        line if the block size is not known), so that a core may start on the blocks of the
        first half before the second has landed."""
        half = _align(self.words // 2, b)
        if self.blk_words and self.w_words >= 2 * self.blk_words:
            nblk = self.w_words // self.blk_words
            m = min(max(1, round((self.words / 2 - self.q_words) / self.blk_words)), nblk - 1)
            half = self.q_words + m * self.blk_words
        if half == 0 or half >= self.words:
            return [(0, self.words)]
        return [(0, half), (half, self.words - half)]

    def blocks_in_first_part(self, b: int) -> int:
        """Blocks whose weight lines lie wholly in :meth:`parts` ``[0]``."""
        if not self.blk_words:
            return 0
        return max(0, (self.parts(b)[0][1] - self.q_words) // self.blk_words)


@dataclass
class TilePlan:
    """One tile's part of a job.

    Attributes
    ----------
    r, c : int
        Array position.
    rows : (int, int, int, int)
        Output rectangle: rows ``[h0, h1)``, columns ``[w0, w1)`` (empty: the tile halts).
    program : list[int]
    dm : dict[int, int]
        Data-memory words the configuration writes (packet headers of the outputs).
    bds : dict[int, list[BufferDescriptor]]
        Per channel (``bd_ch``) its BDs, index = position; a task starts at BD 0.
    locks : dict[int, int]
        Initial lock values.
    regions : dict[str, tuple[int, int]]
        ``name -> (first word, words)``: ``wbuf0``, ``wbuf1``, ``in``, ``out``.
    bands : int
        Bands of output rows the tile computes one after the other (:func:`_bands`; 1: the
        whole rectangle at once).
    band_major : bool
        It runs every chunk on a band, then sends the band's outputs (:func:`_build_job`).
    """

    r: int
    c: int
    rows: tuple[int, int, int, int]
    program: list[int] = field(default_factory=list)
    dm: dict[int, int] = field(default_factory=dict)
    bds: dict[int, list[BufferDescriptor]] = field(default_factory=dict)
    locks: dict[int, int] = field(default_factory=dict)
    regions: dict[str, tuple[int, int]] = field(default_factory=dict)
    bands: int = 1
    band_major: bool = False


@dataclass
class ArrayJob:
    """One overlay run of a layer.

    Attributes
    ----------
    tiles : list[TilePlan]
        Row-major.
    shim_bds : dict[int, dict[int, list[BufferDescriptor]]]
        Per column, per read channel, its BDs (a task starts at BD 0).
    col_rows : list[list[int]]
        Per column, the block rows this job computes.
    row_ranges : list[tuple[int, int, int, int]]
        Per tile row, its output rectangle ``(h0, h1, w0, w1)``.
    chunks : list[list[Chunk]]
        Per column, its weight chunks in stream order.
    memtile_bds : dict[int, dict[int, list[BufferDescriptor]]]
        Per column, per memtile channel (S2MM ``0..``, then MM2S; see
        :func:`tilewright.hw.overlay.array_memtile`), its BDs. A job either captures a
        column's weight streams into its memtile (the packets carry the header's ``mt`` bit;
        S2MM channel ``k`` takes what read channel ``k`` sends) or replays streams an earlier
        job of the layer captured (MM2S channel ``j`` into column bus ``j``), never both for
        its own streams; a layer's last job may also bring the next layer's streams in
        (:func:`add_prefetch`: S2MM BDs after its own, into words its replays do not read).
    memtile_use : dict[int, str]
        Per column that uses its memtile: ``"capture"``, ``"replay"`` or ``"prefetched"``
        (a replay of streams the previous layer's last job brought: :func:`add_prefetch`).
    prefetch : dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]]
        Per ``(column, bus)`` of a ``"prefetched"`` column: the memtile word its stream
        starts at and the pieces the previous layer reads, ``(DDR word of the piece's
        header, DDR word of its stream words, words)``.
    memtile_dm : dict[int, dict[int, int]]
        Per column, memtile words the configuration writes before the run (word address ->
        value): the headers of what the memtile's activation channels send
        (:func:`tilewright.hw.overlay.memtile_act_channels`).
    """

    index: int
    tiles: list[TilePlan]
    shim_bds: dict[int, dict[int, list[BufferDescriptor]]]
    col_rows: list[list[int]]
    row_ranges: list[tuple[int, int, int, int]]
    chunks: list[list[Chunk]]
    memtile_bds: dict[int, dict[int, list[BufferDescriptor]]] = field(default_factory=dict)
    memtile_use: dict[int, str] = field(default_factory=dict)
    prefetch: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = field(
        default_factory=dict)
    #: A streamed job (:func:`_build_stream_job`): tile rows split the block rows, columns
    #: the output rows; ``col_rows[c]`` is every block row column ``c`` computes and
    #: ``row_ranges[c]`` (per column, not per tile row) its output rectangle.
    stream: bool = False
    memtile_dm: dict[int, dict[int, int]] = field(default_factory=dict)

    def records(self, cfg: OverlayConfig) -> list:
        """The configuration records of this job (see :class:`tilewright.sim.overlay_sim.
        CfgRecord`), in a safe order: programs, memory constants, locks, BDs, then tasks."""
        from tilewright.sim.overlay_sim import CfgRecord

        R, C = cfg.array.rows, cfg.array.cols
        out: list[CfgRecord] = []
        tasks: list[CfgRecord] = []
        for t in self.tiles:
            u = t.r * C + t.c
            out += [CfgRecord(CFG_KINDS["pm"], u, 0, a, w) for a, w in enumerate(t.program)]
            out += [CfgRecord(CFG_KINDS["dm"], u, 0, a, w) for a, w in sorted(t.dm.items())]
            out += [CfgRecord(CFG_KINDS["lock"], u, 0, i, v) for i, v in sorted(t.locks.items())]
            for ch, bds in sorted(t.bds.items()):
                out += [CfgRecord(CFG_KINDS["bd"], u, ch, i, _encode(bd))
                        for i, bd in enumerate(bds)]
                if bds:
                    tasks.append(CfgRecord(CFG_KINDS["task"], u, ch, 0, 0))
        for c, words in sorted(self.memtile_dm.items()):
            out += [CfgRecord(CFG_KINDS["dm"], R * C + C + c, 0, a, int(w))
                    for a, w in sorted(words.items())]
        # memtiles before shims: a capturing S2MM channel is ready before its packets come
        for base, units in ((R * C + C, self.memtile_bds), (R * C, self.shim_bds)):
            for c, chans in sorted(units.items()):
                u = base + c
                for ch, bds in sorted(chans.items()):
                    out += [CfgRecord(CFG_KINDS["bd"], u, ch, i, _encode(bd))
                            for i, bd in enumerate(bds)]
                    if bds:
                        tasks.append(CfgRecord(CFG_KINDS["task"], u, ch, 0, 0))
        return out + tasks


@dataclass(frozen=True)
class Placement:
    """Where a layer's tensors and streams sit in a network's DDR image (word addresses).

    Attributes
    ----------
    inputs : tuple of int
        First word of each input tensor (channel-group planes ``[G][H][W]``), in operand
        order.
    output : int
        First word of the output tensor (inside a concat's buffer for a concat input).
    streams : int
        First free word: the layer's packet headers and weight streams go from here on.
    """

    inputs: tuple[int, ...]
    output: int
    streams: int


@dataclass(frozen=True)
class FusedAdd:
    """A residual add computed in a convolution's epilogue (layer fusion).

    The tiles compute the convolution's int8 output as usual, into a scratch region, then
    ``ADD`` it with the residual operand (read from DDR once, into the tile that needs it) and
    send only the sum to DDR: the convolution's output never crosses DDR, and the add needs no
    run of its own. Bit for bit the two layers one after the other.

    Attributes
    ----------
    add : AddLayer
    conv_operand : int
        Which operand of the add the convolution's output is (0: ``a``, 1: ``b``).
    """

    add: AddLayer
    conv_operand: int = 0


@dataclass
class ArrayLayer:
    """A layer compiled for an overlay.

    Attributes
    ----------
    ddr : numpy.ndarray
        The DDR image (unsigned words) from word :attr:`ddr_base` on: stand-alone (no
        :class:`Placement`), the input and the weight streams from word 0, the output zero;
        placed in a network's image, the layer's own headers and weight streams only.
    in_region, out_region : (int, int)
        ``(first word, words)`` of the (first) input and of the output tensor.
    out_shape : (int, int, int)
    jobs : list[ArrayJob]
    macs : int
        Dense multiply-accumulates of the layer.
    nnz_blocks : int
        Of the layer as given (its space-to-depth rewrite has more blocks).
    ddr_bytes_min : int
        Every non-zero weight with its metadata (block index and per-channel bias and
        multiplier), the input and the output, each once (the weights in the layout that
        stores fewer: the layer's blocks or its space-to-depth rewrite's).
    s2d : SpaceToDepth, optional
        The layer runs as this rewrite: the input region holds ``s2d.input(x)``, and
        :attr:`in_shape`, :attr:`kernel` and :attr:`stride` are the layer's as given.
    issued_macs : int
        MACs the engines issue: every non-zero block of the layer as it runs (its rewrite's)
        over every tap and output pixel, channel padding included.
    extra_reads : tuple[tuple[int, numpy.ndarray], ...]
        ``(first word, words)`` of DDR this layer's jobs read beyond :attr:`ddr` and its
        tensors: the next layer's weight streams its last job prefetches (:func:`add_prefetch`).
    """

    name: str
    cfg: OverlayConfig
    ddr: np.ndarray
    in_region: tuple[int, int]
    out_region: tuple[int, int]
    in_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    jobs: list[ArrayJob]
    macs: int
    nnz_blocks: int
    ddr_bytes_min: int
    kernel: tuple[int, int]
    stride: int
    ddr_base: int = 0
    operand_regions: tuple[tuple[int, int], ...] = ()
    s2d: SpaceToDepth | None = None
    issued_macs: int = 0
    extra_reads: tuple[tuple[int, np.ndarray], ...] = ()

    def config_bytes(self) -> int:
        """Bytes the configuration port loads over all runs: programs (8 bytes a word, block
        indices included), data-memory constants (output packet headers) and BDs."""
        from tilewright.hw.bd import BD_BITS

        b = self.cfg.tile.block
        n = 0
        for job in self.jobs:
            for t in job.tiles:
                n += 8 * len(t.program) + b * len(t.dm)
                n += sum(len(bds) for bds in t.bds.values()) * -(-BD_BITS // 8)
            n += sum(len(bds) for per in job.shim_bds.values() for bds in per.values()) \
                * -(-BD_BITS // 8)
        return n

    def job_output_index(self, job: ArrayJob) -> np.ndarray:
        """Word offsets (in the output region) that ``job`` writes."""
        _, ho, wo = self.out_shape
        idx = []
        for c, rows in enumerate(job.col_rows):
            for g in rows:
                for h0, h1, w0, w1 in (job.row_ranges[c:c + 1] if job.stream
                                       else job.row_ranges):
                    for y in range(h0, h1):
                        idx.append(np.arange(g * ho * wo + y * wo + w0,
                                             g * ho * wo + y * wo + w1))
        return np.concatenate(idx) if idx else np.zeros(0, np.int64)

    def merge_outputs(self, dumps: list[np.ndarray]) -> np.ndarray:
        """The output region from per-job dumps (job ``i`` ran on a fresh DDR image and wrote
        only its part)."""
        out = np.zeros(self.out_region[1], dtype=np.uint64)
        for job, d in zip(self.jobs, dumps, strict=True):
            k = self.job_output_index(job)
            out[k] = np.asarray(d, dtype=np.uint64)[k]
        return out

    def read_output(self, out_words: np.ndarray) -> np.ndarray:
        """The int8 ``(C, Ho, Wo)`` output from the output region's words."""
        return read_planes(out_words, self.out_shape, self.cfg.tile.block)


def read_planes(words: np.ndarray, shape: tuple[int, int, int], b: int) -> np.ndarray:
    """The int8 ``(C, H, W)`` tensor stored as channel-group planes ``[G][H][W]`` of ``b``-byte
    words (the inverse of the layout :func:`_planes` writes)."""
    c, h, w = shape
    g = _cdiv(c, b)
    raw = np.asarray(words, dtype=np.uint64)[:g * h * w]
    by = raw.astype("<u8").view(np.uint8).reshape(g, h, w, 8)[..., :b]
    return np.ascontiguousarray(by.view(np.int8).transpose(0, 3, 1, 2)
                                .reshape(g * b, h, w)[:c])


# ---------------------------------------------------------------------------------------------

def _words_of(raw: np.ndarray, b: int) -> np.ndarray:
    """uint8 bytes (multiple of b) -> unsigned words (uint64) of b bytes, little-endian."""
    by = np.asarray(raw, dtype=np.uint8).reshape(-1, b)
    pad = np.zeros((by.shape[0], 8), dtype=np.uint8)
    pad[:, :b] = by
    return pad.view("<u8").reshape(-1).astype(np.uint64)


def _planes(x: np.ndarray, b: int) -> np.ndarray:
    """An int8 ``(C, H, W)`` tensor as DDR words in channel-group planes ``[G][H][W]``
    (channels padded with zeros to a multiple of ``b``)."""
    c, h, w = x.shape
    g = _cdiv(c, b)
    full = np.zeros((g * b, h, w), dtype=np.int8)
    full[:c] = x
    return _words_of(full.reshape(g, b, h, w).transpose(0, 2, 3, 1).reshape(-1)
                     .view(np.uint8), b)


class _DdrImage:
    """A layer's DDR image while it is compiled.

    Stand-alone (``place`` None): the operands as channel-group planes from word 0, one after
    the other, then the (zero) output. Placed in a network's image: the operands and the
    output where ``place`` says (not in this image), which holds only what :meth:`put`
    appends from ``place.streams`` on.
    """

    def __init__(self, xs: list[np.ndarray], out_words: int, b: int,
                 place: Placement | None, lname: str) -> None:
        self.b = b
        self.sizes = [_cdiv(x.shape[0], b) * x.shape[1] * x.shape[2] for x in xs]
        self.parts: list[np.ndarray] = []
        if place is None:
            self.parts = [_planes(x, b) for x in xs]
            self.bases = [sum(self.sizes[:i]) for i in range(len(xs))]
            self.out_base = sum(self.sizes)
            self.parts.append(np.zeros(out_words, np.uint64))
            self.base, self.top = 0, self.out_base + out_words
        else:
            if len(place.inputs) != len(xs):
                raise ValueError(f"layer {lname!r}: placement gives {len(place.inputs)} "
                                 f"inputs, the layer has {len(xs)}")
            self.bases, self.out_base = list(place.inputs), place.output
            self.base = self.top = place.streams

    def put(self, words: np.ndarray) -> int:
        """Append ``words``; their first address."""
        base = self.top
        self.parts.append(np.asarray(words, dtype=np.uint64))
        self.top += len(words)
        return base

    def mark(self) -> tuple[int, int]:
        return len(self.parts), self.top

    def rollback(self, mark: tuple[int, int]) -> None:
        """Drop what :meth:`put` appended since ``mark``."""
        del self.parts[mark[0]:]
        self.top = mark[1]

    def words(self) -> np.ndarray:
        """The image from :attr:`base` on (words of ``b`` bytes)."""
        ddr = np.concatenate(self.parts) if self.parts else np.zeros(0, np.uint64)
        if self.b < 8:
            ddr &= np.uint64((1 << (8 * self.b)) - 1)
        return ddr

    def regions(self) -> tuple[tuple[int, int], ...]:
        return tuple(zip(self.bases, self.sizes, strict=True))


def _balance(nnz: np.ndarray, cols: int) -> list[list[int]]:
    """Deal block rows to columns: densest first, each to the least-loaded column (ties: the
    column with fewer rows, then the lower index). Each column takes its rows densest first
    (ties: ascending): its first block row uses every input channel group, so the whole
    activation slice must have landed before it ends, and the densest row gives the slice the
    most compute cycles to arrive in (the eight conv/FC layers of the issue #3 set on aie2-4x4
    at 50 % block sparsity, on the model: seven faster, 2.96 k cycles fewer in all)."""
    loads = [0] * cols
    counts = [0] * cols
    out: list[list[int]] = [[] for _ in range(cols)]
    cap = _cdiv(len(nnz), cols)
    for g in sorted(range(len(nnz)), key=lambda g: (-int(nnz[g]), g)):
        c = min((c for c in range(cols) if counts[c] < cap),
                key=lambda c: (loads[c], counts[c], c))
        out[c].append(g)
        loads[c] += int(nnz[g]) + 1
        counts[c] += 1
    return [sorted(rows, key=lambda g: (-int(nnz[g]), g)) for rows in out]


def _balance_contiguous(nnz: np.ndarray, cols: int, extra: int = 1) -> list[list[int]]:
    """Deal block rows to columns as contiguous ranges, ascending, with the least possible
    largest load (a row's load: its non-zero blocks plus ``extra``): a fused residual add
    reads each tile's residual channel groups as one range (one DDR descriptor)."""
    load = [int(v) + extra for v in nnz]

    def cut(limit: int) -> list[list[int]] | None:
        out: list[list[int]] = [[]]
        acc = 0
        for g, v in enumerate(load):
            if out[-1] and acc + v > limit:
                out.append([])
                acc = 0
            out[-1].append(g)
            acc += v
        return out if len(out) <= cols else None

    lo, hi = max(load, default=0), sum(load)
    while lo < hi:
        mid = (lo + hi) // 2
        if cut(mid) is None:
            lo = mid + 1
        else:
            hi = mid
    out = cut(lo) or [[]]
    return out + [[] for _ in range(cols - len(out))]


def _split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    base, extra = divmod(n, parts)
    out, h = [], 0
    for p in range(parts):
        k = base + (1 if p < extra else 0)
        out.append((h, h + k))
        h += k
    return out


def _ramp_split(n: int, parts: int) -> list[tuple[int, int]]:
    """``[0, n)`` in ``parts`` contiguous ranges growing geometrically from one."""
    if n <= parts:
        return [(i, i + 1) for i in range(n)]
    if parts == 1:
        return [(0, n)]
    lo, hi = 1.0 + 1e-9, 16.0
    for _ in range(60):
        g = (lo + hi) / 2
        if (g ** parts - 1) / (g - 1) > n:
            hi = g
        else:
            lo = g
    g = lo
    out, a = [], 0
    acc = 0.0
    for i in range(parts):
        acc += g ** i
        z = n if i == parts - 1 else min(max(a + 1, round(acc)), n - (parts - 1 - i))
        out.append((a, z))
        a = z
    return out


def _row_cuts(rows: int, n: int, first: int, height: int) -> list[tuple[int, int]]:
    """``rows`` slice rows (image rows ``first ..``, ``height`` of them in the image) cut into
    at most ``n`` consecutive ranges, each with at least one image row (halo rows join their
    neighbour)."""
    def halo_only(cut: tuple[int, int]) -> bool:
        return min(first + cut[1], height) <= max(first + cut[0], 0)

    cuts: list[tuple[int, int]] = []
    for ya, yb in _split_rows(rows, n):
        if yb == ya:
            continue
        if cuts and halo_only(cuts[-1]):
            ya = cuts.pop()[0]
        cuts.append((ya, yb))
    if len(cuts) > 1 and halo_only(cuts[-1]):
        last = cuts.pop()
        cuts[-1] = (cuts[-1][0], last[1])
    return cuts


def _bands(geo: _Geometry, t, rows: int, cols: int, first: int, n_act_parts: int
           ) -> tuple[list[tuple[int, int]], list[tuple[int, int]], list[int]] | None:
    """Output row bands for a tile whose ``rows x cols`` rectangle has more pixel groups than
    an accumulator buffer holds (its CONVs cannot stop at an activation part, so without
    bands it computes only once its whole slice has landed): the core runs every block row
    on one band of output rows after the other, each band once the slice rows it needs have
    landed, while the rest stream in. Returns the bands, the slice-row parts (each at least
    one image row: ``first`` is the slice's first image row) and per band its last part;
    None where bands do not apply (one output row, or a row-major slice row too long for
    ``IN_ROW``)."""
    if rows < 2 or rows * _cdiv(cols, t.pixels) <= t.acc_depth:
        return None
    cols_in = geo.cols_in(cols)
    if not param_range(Param.IN_ROW, t).accepts(geo.gin * cols_in) or \
            not param_range(Param.IN_BASE, t).accepts(geo.rows_in(rows) * geo.gin * cols_in):
        return None
    bands = [bd for bd in _split_rows(rows, min(rows, max(1, n_act_parts // 2))) if bd[1] > bd[0]]
    ends = [(o1 - 1) * geo.s + geo.kh for _, o1 in bands]
    ends[-1] = geo.rows_in(rows)
    cuts: list[tuple[int, int]] = []
    start = 0
    for e in ends:
        if e <= start:
            continue
        # a part of halo rows only (no image row) joins the next one
        if min(first + e, geo.h) > max(first + start, 0):
            cuts.append((start, e))
            start = e
    if start < ends[-1]:
        if not cuts:
            return None
        cuts[-1] = (cuts[-1][0], ends[-1])
    last = [min(i for i, (_, yb) in enumerate(cuts) if yb >= e) for e in ends]
    return bands, cuts, last


def _free_chunk(p: Program, buf: int, nparts: int, out_lock: int | None) -> int:
    """End a weight chunk in ``p``: wait for its writebacks, free weight buffer ``buf``'s
    ``nparts`` parts and, with ``out_lock``, release the chunk's outputs to MM2S. Returns the
    output releases (0 or 1)."""
    p.nop(fence=True)
    for part in range(nparts):
        p.release(LOCK_WEMPTY[buf][part])
    if out_lock is None:
        return 0
    p.release(out_lock)
    return 1


def _max_groups(ranges: list[tuple[int, int, int, int]], pixels: int) -> int:
    """Pixel groups of the largest of the output rectangles ``ranges`` (a row of ``w`` pixels
    is ``ceil(w / pixels)`` groups)."""
    return max((h1 - h0) * _cdiv(w1 - w0, pixels) for h0, h1, w0, w1 in ranges)


def _take_parts(p: Program, slots: list[int], got: int, upto: int) -> int:
    """Acquire activation parts ``got..upto`` (``slots[i]``: part ``i``'s channel slot) in
    ``p``: a slot's parts land in order, so its lock counts them. Returns the parts acquired."""
    cnt: dict[int, int] = {}
    for q in range(got, upto + 1):
        cnt[slots[q]] = cnt.get(slots[q], 0) + 1
    for sl in sorted(cnt):
        p.acquire(ACT_LOCKS[sl], cnt[sl])
    return max(got, upto + 1)


def _linear_bds(base: int, words: int, **kw) -> list[BufferDescriptor]:
    """BDs covering ``words`` consecutive words from ``base`` (chained by the caller)."""
    out = []
    while words > 0:
        if words <= _DIM_MAX:
            out.append(BufferDescriptor(base, (words,), (1,), **kw))
            break
        n1 = min(words // 32768, _DIM_MAX)
        out.append(BufferDescriptor(base, (32768, n1), (1, 32768), **kw))
        base += 32768 * n1
        words -= 32768 * n1
    return out


def _chain(bds: list[BufferDescriptor], first: int = 0) -> list[BufferDescriptor]:
    """Chain ``bds`` in order (BD i at index first + i continues with i + 1)."""
    out = []
    for i, bd in enumerate(bds):
        nxt = first + i + 1 if i + 1 < len(bds) else None
        if nxt is not None:
            check_int("next_bd", nxt, 0, MAX_BDS - 1)
        # a copy with only next_bd changed: bd's fields are checked already (a compile of
        # resnet50 chains some 90 k BDs)
        nb = copy.copy(bd)
        object.__setattr__(nb, "next_bd", nxt)
        out.append(nb)
    return out


def _token_word(cfg: OverlayConfig) -> int:
    """The memtile word where tokens and wrapper headers land (its last: the streams a
    memtile keeps lie below it)."""
    return cfg.memtile.bytes // cfg.tile.block - 1


@dataclass
class _Geometry:
    cin: int
    h: int
    w: int
    cout: int
    ho: int
    wo: int
    kh: int
    kw: int
    s: int
    ph: int
    pw: int
    gin: int
    gout: int
    # the input as stored (channel-group planes of ``in_h x in_w`` words): a 1x1 convolution
    # of stride s > 1 without padding is a 1x1 convolution of stride 1 on every s-th row and
    # column, which the activation BDs pick (``sub`` = s), so the other 3 pixels of 4 never
    # cross DDR or take tile memory
    in_h: int = 0
    in_w: int = 0
    sub: int = 1

    def __post_init__(self) -> None:
        self.in_h = self.in_h or self.h
        self.in_w = self.in_w or self.w

    def rows_in(self, rows: int) -> int:
        return (rows - 1) * self.s + self.kh if rows else 0

    def cols_in(self, cols: int) -> int:
        return (cols - 1) * self.s + self.kw if cols else 0

    @property
    def wp(self) -> int:
        return self.w + 2 * self.pw


def _out_layout(geo: _Geometry, rows: int, cols: int, slots: int = 1
                ) -> tuple[int, int, bool]:
    """(OUT_ROW, OUT_CG, one header per row) of a tile's output region: a full-width
    rectangle is contiguous in DDR (one packet per block row, its header before the plane,
    or with ``slots`` > 1 one packet per row band, :func:`_hdr_slots`, a header slot before
    each band); a narrower one needs a packet per output row (a header slot before every
    row)."""
    if cols == geo.wo:
        return cols, rows * cols + slots, False
    return cols + 1, rows * (cols + 1), True


def _hdr_slots(geo: _Geometry, t, rows: int, cols: int, fused: bool = False) -> int:
    """Header slots a full-width tile's output planes keep: one per row band it may release
    on its own (:func:`_bands`, band-major order in :func:`_build_job`), else 1."""
    if fused or cols != geo.wo or rows < 2 or rows * _cdiv(cols, t.pixels) <= t.acc_depth:
        return 1
    return min(rows, ACT_PARTS_PER_CHANNEL // 2)


def _tile_words(geo: _Geometry, rows: int, cols: int, n_out_rows: int, slots: int = 1
                ) -> tuple[int, int]:
    """(input slice words, output region words) of a tile computing a ``rows x cols`` output
    rectangle of ``n_out_rows`` block rows (``slots``: :func:`_out_layout`)."""
    if rows == 0 or cols == 0:
        return 0, 0
    return (geo.gin * geo.rows_in(rows) * geo.cols_in(cols),
            n_out_rows * _out_layout(geo, rows, cols, slots)[1])


def _rectangles(geo: _Geometry, h0: int, h1: int, R: int, pixels: int
                ) -> list[tuple[int, int, int, int]]:
    """Split output rows ``[h0, h1)`` x all columns into ``R`` rectangles (one per tile row):
    the grid ``Rh x Rw = R`` with the fewest pixel groups in the largest rectangle (the
    engine computes ``ceil(cols / pixels)`` groups per row), then the least input."""
    best = None
    for rh in range(1, R + 1):
        if R % rh:
            continue
        rw = R // rh
        hs = _split_rows(h1 - h0, rh)
        ws = _split_rows(geo.wo, rw)
        groups = max(hb - ha for ha, hb in hs) * max(-(-(wb - wa) // pixels) for wa, wb in ws)
        inputs = sum(geo.rows_in(hb - ha) * geo.cols_in(wb - wa) for ha, hb in hs
                     for wa, wb in ws)
        key = (groups, inputs, rh)
        if best is None or key < best[0]:
            best = (key, [(h0 + ha, h0 + hb, wa, wb) for ha, hb in hs for wa, wb in ws])
    assert best is not None
    return best[1]


def _chunks(rows: list[int], nnz: list[int], blk_words: int, cap: int, b: int, qrec: int,
            max_chunks: int, split: bool = False, ramp: int = 0,
            down: bool = False) -> list[Chunk] | None:
    """Greedy chunks of ``rows`` (``nnz`` non-zero blocks of ``blk_words`` weight words each)
    no larger than ``cap`` words. With ``split`` a row larger than a chunk is cut into pieces
    (see :class:`Chunk`); otherwise such a row makes it None. The first chunk is small, so that
    the cores start as early as possible: with ``ramp`` (pieces allowed) it holds at most
    ``ramp`` words and each next chunk at most :data:`RAMP_GROWTH` times the previous one
    (so that it streams in while the core computes on that one), and with ``down`` at most
    :data:`RAMP_DOWN` of the words left (so that the last chunk's outputs are few); without,
    it is a single block row."""
    out: list[Chunk] = []
    cur: list[tuple[int, int, int]] = []
    w = 0
    total = sum(nnz) * blk_words + _align(qrec, b) * len(rows)
    done = 0                                 # words in the closed chunks

    def close() -> None:
        nonlocal cur, w, done
        out.append(Chunk(cur, _align(len(cur) * qrec, b), w, 0, blk_words=blk_words))
        done += out[-1].words
        cur, w = [], 0
        if len(out) > max_chunks:
            raise _TooMany

    def limit() -> int:
        grow = int(out[-1].words * RAMP_GROWTH) if out else ramp
        tail = max(ramp, int((total - done) * RAMP_DOWN)) if down else cap
        return max(min(cap, grow, tail), blk_words + _align(qrec, b))

    try:
        if ramp:
            # fill every chunk to its limit, cutting block rows at any block
            for g, n in zip(rows, nnz, strict=True):
                j = 0
                while True:
                    k = min(n - j, (limit() - _align((len(cur) + 1) * qrec, b) - w) // blk_words)
                    if k < 1 and (n > j or _align((len(cur) + 1) * qrec, b) + w > limit()):
                        close()
                        continue
                    cur.append((g, j, j + k))
                    w += k * blk_words
                    j += k
                    if j == n:
                        break
        else:
            for g, n in zip(rows, nnz, strict=True):
                ww = n * blk_words
                if cur and (_align((len(cur) + 1) * qrec, b) + w + ww > cap or not out):
                    close()
                if _align((len(cur) + 1) * qrec, b) + w + ww <= cap:
                    cur.append((g, 0, n))
                    w += ww
                    continue
                if not split or n < 2:
                    return None
                j = 0
                while j < n:
                    k = (cap - _align((len(cur) + 1) * qrec, b) - w) // blk_words
                    if k < 1:
                        if not cur:
                            return None
                        close()
                        continue
                    k = min(k, n - j)
                    cur.append((g, j, j + k))
                    w += k * blk_words
                    j += k
                    if j < n:
                        close()
        if cur:
            close()
    except _TooMany:
        return None
    finished = 0
    for chk in out:
        chk.first = finished
        chk.rows = [g for g, _, j1 in chk.pieces if j1 == nnz[rows.index(g)]]
        finished += len(chk.rows)
    return out


@dataclass(frozen=True)
class SpaceToDepth:
    """A stride-2 convolution on few input channels rewritten as a stride-1 convolution on
    the space-to-depth input (every 2x2 pixel square one pixel of 4x the channels).

    An 8x8 weight block spans 8 input channels: the 3 channels of an RGB image fill 3 of a
    block's 8 lanes, and a 7x7/2 stem takes 49 block-taps per output channel group. On the
    padded input's 2x2 squares it is a 4x4/1 convolution on 12 channels (2 channel groups):
    32 block-taps, 35 % fewer MAC cycles, and half the input words (a word carries 4 pixels'
    3 channels). Bit for bit the same sums: every product of the original is one product of
    the rewrite (the taps past the kernel are zero weights).

    Attributes
    ----------
    pad_before : (int, int)
        Zero rows and columns before the input (the padding rounded up to even).
    shape : (int, int, int)
        The rewritten input ``(4 x Cin, Hs, Ws)``: channel ``(py * 2 + px) * Cin + c`` of
        pixel ``(a, b)`` is the padded input's channel ``c`` at ``(2a + py, 2b + px)``.
    """

    pad_before: tuple[int, int]
    shape: tuple[int, int, int]

    @staticmethod
    def of(layer: ConvLayer, in_shape: tuple[int, int, int], b: int) -> SpaceToDepth | None:
        """The rewrite of ``layer`` if it takes fewer block-taps, else None."""
        (kh, kw), s, (ph, pw) = layer.kernel, layer.stride, layer.padding
        cin = in_shape[0]
        if s != 2 or layer.is_linear or min(kh, kw) < 2:
            return None
        kh2, kw2 = -(-(kh + ph % 2) // 2), -(-(kw + pw % 2) // 2)
        if kh2 * kw2 * -(-4 * cin // b) >= kh * kw * -(-cin // b):
            return None
        _, ho, wo = output_shape(layer, in_shape)
        return SpaceToDepth((ph + ph % 2, pw + pw % 2), (4 * cin, ho + kh2 - 1, wo + kw2 - 1))

    def input(self, x: np.ndarray) -> np.ndarray:
        """The rewritten int8 input of ``x`` ``(Cin, H, W)``."""
        cin, h, w = x.shape
        _, hs, ws = self.shape
        (ay, ax) = self.pad_before
        xp = np.zeros((cin, 2 * hs, 2 * ws), np.int8)
        hh, ww = min(h, 2 * hs - ay), min(w, 2 * ws - ax)
        xp[:, ay:ay + hh, ax:ax + ww] = x[:, :hh, :ww]
        # (c, a, py, b, px) -> (py, px, c, a, b)
        return np.ascontiguousarray(xp.reshape(cin, hs, 2, ws, 2).transpose(2, 4, 0, 1, 3)
                                    .reshape(4 * cin, hs, ws))

    def layer(self, layer: ConvLayer) -> ConvLayer:
        """The stride-1 layer on :meth:`input`."""
        w = layer.weight
        cout, cin, kh, kw = w.shape
        (ph, pw), (ay, ax) = layer.padding, self.pad_before
        dy, dx = ay - ph, ax - pw
        kh2, kw2 = -(-(kh + dy) // 2), -(-(kw + dx) // 2)
        # tap (2 q + p - d) of the original is tap q of input phase p
        wp = np.zeros((cout, cin, 2 * kh2, 2 * kw2), np.int8)
        wp[:, :, dy:dy + kh, dx:dx + kw] = w
        w2 = (wp.reshape(cout, cin, kh2, 2, kw2, 2).transpose(0, 3, 5, 1, 2, 4)
              .reshape(cout, 4 * cin, kh2, kw2))
        return dataclasses.replace(layer, weight=np.ascontiguousarray(w2), stride=1,
                                   padding=(0, 0))


def compile_conv_array(layer: ConvLayer, x: np.ndarray, cfg: OverlayConfig, *,
                       name: str | None = None, place: Placement | None = None,
                       memtile: bool = True, fuse: FusedAdd | None = None,
                       x_res: np.ndarray | None = None, repack: bool = True,
                       prefetch_at: dict[int, int] | None = None,
                       stream: bool = True) -> ArrayLayer:
    """Compile a convolution (or linear) layer with input ``x`` for ``cfg``'s array.

    Parameters
    ----------
    layer : ConvLayer
        The quantised layer (its zero 8x8 blocks are skipped).
    x : numpy.ndarray
        int8 input ``(Cin, H, W)`` (linear: ``(Cin,)``); with ``place`` only its shape counts.
    cfg : OverlayConfig
    place : Placement, optional
        Compile for a network's DDR image: the input and output at the given addresses (not
        in :attr:`ArrayLayer.ddr`), the headers and weight streams from ``place.streams``.
    memtile : bool
        Where several runs stream a column the same weights, the first captures them into
        the column's memtile and the others replay them from there (:func:`_memtile_plan`);
        False: every run reads them from DDR.
    fuse : FusedAdd, optional
        Add the residual operand ``x_res`` (int8, the output's shape; with ``place`` its
        address is ``place.inputs[1]``) to the convolution's output in the tiles: the layer's
        output is the add's. Columns then take contiguous ranges of block rows.
    repack : bool
        Compile a stride-2 convolution on few input channels as its :class:`SpaceToDepth`
        rewrite where that takes fewer block-taps: the input region then holds
        :meth:`SpaceToDepth.input` of the input (:attr:`ArrayLayer.s2d`; with ``place`` the
        caller writes it so).
    prefetch_at : dict[int, int], optional
        Per column, the first memtile word the previous layer's last job leaves free: a
        layer of one run whose column's weight streams fit from there replays them from the
        memtile (``"prefetched"``), and the previous layer's last job brings them
        (:func:`add_prefetch`, which the caller applies; the streams lie in this layer's DDR
        image, :attr:`ArrayJob.prefetch`).
    stream : bool
        A convolution that would take several runs runs as fewer streamed runs where they
        fit (:func:`_build_stream_job`); False: never.

    Raises
    ------
    ValueError
        If the layer cannot run on the array (the message says which capacity is short).
    """
    if not isinstance(layer, ConvLayer):
        raise TypeError(f"layer must be a ConvLayer, not {type(layer).__name__}")
    if not isinstance(cfg, OverlayConfig):
        raise TypeError(f"cfg must be an OverlayConfig, not {cfg!r}")
    t = cfg.tile
    b = t.block
    R, C = cfg.array.rows, cfg.array.cols
    rf = route_fields(cfg)
    lname = name or layer.name
    xa = np.asarray(x)
    if xa.dtype != np.int8:
        raise TypeError(f"layer {lname!r}: input must be int8, not {xa.dtype}")
    if layer.is_linear and xa.ndim == 1:
        xa = xa.reshape(-1, 1, 1)
    cout, ho, wo = output_shape(layer, xa.shape)
    orig, orig_shape = layer, xa.shape
    s2d = SpaceToDepth.of(layer, xa.shape, b) if repack and fuse is None else None
    if s2d is not None:
        layer, xa = s2d.layer(layer), s2d.input(xa)
        assert output_shape(layer, xa.shape) == (cout, ho, wo)
    cin, h, w = xa.shape
    (kh, kw), s, (ph, pw) = layer.kernel, layer.stride, layer.padding
    if (kh, kw) == (1, 1) and s > 1 and (ph, pw) == (0, 0):
        geo = _Geometry(cin, ho, wo, cout, ho, wo, 1, 1, 1, 0, 0, _cdiv(cin, b), _cdiv(cout, b),
                        h, w, s)
    else:
        geo = _Geometry(cin, h, w, cout, ho, wo, kh, kw, s, ph, pw, _cdiv(cin, b),
                        _cdiv(cout, b))
    mask = block_mask(layer.weight, b)                      # (gout, gin)
    nnz_row = mask.sum(axis=1)
    taps = kh * kw
    w_words_row = [int(n) * taps * b for n in nnz_row]
    qrec = t.qrec_words

    # ---- DDR: input and output tensors ----------------------------------------------------
    out_words = geo.gout * ho * wo
    xs = [xa]
    if fuse is not None:
        if not isinstance(fuse, FusedAdd) or fuse.conv_operand not in (0, 1):
            raise TypeError(f"layer {lname!r}: fuse must be a FusedAdd with conv_operand 0 "
                            f"or 1, not {fuse!r}")
        xr = np.asarray(x_res) if x_res is not None else None
        if xr is None or xr.dtype != np.int8 or xr.shape != (cout, ho, wo):
            raise ValueError(f"layer {lname!r}: a fused add needs an int8 residual x_res of "
                             f"the output's shape {(cout, ho, wo)}, not "
                             f"{None if xr is None else (xr.dtype, xr.shape)}")
        xs.append(xr)
    img = _DdrImage(xs, out_words, b, place, lname)
    in_base, out_base, in_size = img.bases[0], img.out_base, img.sizes[0]
    res_base = img.bases[1] if fuse is not None else None

    # ---- partition ---------------------------------------------------------------------------
    col_rows_all = (_balance(nnz_row, C) if fuse is None
                    else _balance_contiguous(nnz_row * taps, C, 2))
    # the split into runs with the least extra DDR traffic (weights re-read per output-row
    # part, the input re-read per block-row part) plus RUN_COST_CYCLES per run plus what the
    # runs lose to transfers the cores cannot overlap; for a given row split more block-row
    # parts only cost more traffic, so past the first that fits only a loss can make more
    # parts pay, and they are tried in steps of a quarter (VGG16 classifier.0: 64 parts fit,
    # 126 are double-buffered)
    best = None
    run_cost = int(RUN_COST_CYCLES * _read_rate(cfg))
    for n_rsplit in range(1, ho + 1):
        w_cost = (n_rsplit - 1) * sum(w_words_row)
        if best is not None and w_cost >= best[0]:
            break
        n_gsplit, fitted = 1, False
        while n_gsplit <= geo.gout:
            cost = w_cost + (n_gsplit - 1) * geo.gin * geo.h * geo.w    # the input read
            if best is not None and cost >= best[0]:
                break
            plan = _try_plan(geo, col_rows_all, w_words_row, nnz_row, n_rsplit, n_gsplit, R, t,
                             qrec, fuse is not None)
            if plan is not None:
                lost = _overlap_loss_words(plan, geo, cfg)
                cost += len(plan) * run_cost + lost
                if best is None or cost < best[0]:
                    best = (cost, plan)
                if not lost:
                    break
                fitted = True
            n_gsplit = max(n_gsplit + 1, n_gsplit * 5 // 4) if fitted else n_gsplit + 1
    if best is None:
        biggest = max(w_words_row) + _align(qrec, b)
        raise ValueError(
            f"layer {lname!r} ({cin}->{cout}, {kh}x{kw}, {h}x{w}) does not fit {cfg.name}'s "
            f"tiles: one block row needs {biggest * b} bytes of weights and requantisation "
            f"records (or, cut into pieces, one block and a record), plus an input slice and "
            f"its output, in {t.dmem_bytes} bytes")
    jobs_spec = best[1]

    jobs: list[ArrayJob] = []
    wlines = _weight_lines_all(layer, b)        # once: a layer of many runs needs them all
    # fewer runs that stream their input through the tiles, where they fit and take fewer
    # cycles by a rough count
    runs_rough: int | None = None
    for n in range(1, min(len(jobs_spec), STREAM_RUNS_MAX) + 1
                   if stream and s2d is None and len(jobs_spec) > 1 else 0):
        mark = img.mark()
        rough = 0
        for i, part in enumerate(_split_rows(ho, n)):
            sj = _build_stream_job(i, geo, layer, cfg, rf, in_base, out_base, img.put, wlines,
                                   nnz_row, part, fuse, res_base)
            if sj is None:
                break
            jobs.append(sj[0])
            rough += sj[1]
        fitted = len(jobs) == n
        if fitted and runs_rough is None:
            runs_rough = _runs_rough(jobs_spec, geo, nnz_row, cfg, fuse is not None)
        if fitted and rough < runs_rough:
            jobs_spec = []
            break
        jobs.clear()
        img.rollback(mark)
        if fitted:
            break                   # more streamed runs would not count fewer cycles
    mt_plan = (_memtile_plan(jobs_spec, cfg, prefetch_at) if memtile
               else [{} for _ in jobs_spec])
    # as many activation parts as the shim's BDs allow (more parts: the cores start sooner);
    # a fused layer's residual parts too (more: the earlier the first outputs leave). The
    # runs of a layer are alike: each starts from what the one before could take
    most = ACT_PARTS_PER_CHANNEL if kh * kw == 1 else ACT_PARTS_KXK
    tries = ([(n, 0) for n in _ACT_TRIES if n <= most] if fuse is None
             else list(_FUSED_TRIES))
    first_try = 0
    for ji, (row_ranges, col_rows, chunks, layout) in enumerate(jobs_spec):
        for i in range(first_try, len(tries)):
            n_act, n_res = tries[i]
            mark = img.mark()
            try:
                job = _build_job(ji, geo, layer, cfg, row_ranges, col_rows, chunks, layout, rf,
                                 in_base, out_base, img.put, n_act, wlines, mt_plan[ji],
                                 fuse, res_base, n_res)
                first_try = i
                break
            except (_ShimBdsShort, _ProgramTooLong):
                img.rollback(mark)
                if i == len(tries) - 1:
                    raise
        jobs.append(job)

    nnz = int(mask.sum())
    issued = nnz * taps * b * b * ho * wo
    # non-zero blocks with their weight lines and indices, in the layout that stores fewer
    w_min = nnz * taps * b * b + nnz * 2
    # the MACs, the input term and the blocks reported are the layer's as given (not its
    # space-to-depth rewrite's)
    if s2d is not None:
        nnz = int(block_mask(orig.weight, b).sum())
        cin, h, w = orig_shape
        (kh, kw), s, (ph, pw) = orig.kernel, orig.stride, orig.padding
        taps = kh * kw
        w_min = min(w_min, nnz * taps * b * b + nnz * 2)
    macs = cout * cin * kh * kw * ho * wo
    # the input pixels some window reads (a 1x1/2 conv reads a quarter of them)
    used_h = np.unique((np.arange(ho)[:, None] * s - ph + np.arange(kh)[None, :]).ravel())
    used_w = np.unique((np.arange(wo)[:, None] * s - pw + np.arange(kw)[None, :]).ravel())
    n_in = int(((used_h >= 0) & (used_h < h)).sum()) * int(((used_w >= 0) & (used_w < w)).sum())
    ddr_min = (w_min + cout * 8 + cin * n_in
               + (2 if fuse is not None else 1) * cout * ho * wo)
    _check_out_words(cfg, lname, out_base, out_words)
    return ArrayLayer(lname, cfg, img.words(), (in_base, in_size), (out_base, out_words),
                      (cin, h, w), (cout, ho, wo), jobs, macs, nnz, ddr_min, (kh, kw), s,
                      img.base, img.regions(), s2d, issued)


def _program_words(chunks: list[Chunk], nnz_row: np.ndarray, b: int,
                   act_parts: int = 2 * ACT_PARTS_PER_CHANNEL, fused: bool = False,
                   bands: int = 1) -> int:
    """Words of a tile program over ``chunks`` (as :func:`_build_job` writes it) whose input
    slice comes in ``act_parts`` parts (``fused``: with a residual add's epilogue; ``bands``:
    computed in that many row bands, :func:`_bands`)."""
    # SETPs, HALT, the input's ACQs and the CONVs they cut (HOLD, SETP, ACC: 4 words more)
    n = 11 + 1 + 5 * act_parts
    if fused:
        # MUL_A, MUL_B; per output batch 15 SETPs, a fence, the residual's ACQ, the REL and
        # an ADD per row
        n += 2 + OUT_BATCHES * 18 + sum(len(chk.rows) for chk in chunks)
    else:
        n += 2 * OUT_BATCHES                        # output batches inside chunks: fence, REL
    for chk in chunks:
        parts = len(chk.parts(b))
        n += 2 * parts + 3 + 1 + 4 * (parts - 1)    # ACQ/REL per part, 3 SETPs, fence, a cut
        n += 1 if chk.rows else 0                   # REL of the output buffer
        n += bands * sum(1 + -(-(j1 - j0) // INDEX_PER_WORD) for _, j0, j1 in chk.pieces)
        n += 6 * (bands - 1)                        # per band 5 SETPs and an ACQ
    if bands > 1:
        n += 2 * bands                              # band-major: per band a fence, a REL
    return n


def _read_rate(cfg: OverlayConfig) -> float:
    """DDR words per cycle the array's read channels move, all of them together."""
    step = cfg.ddr_interval
    return cfg.array.cols * cfg.ddr.read_channels / step


def _overlap_loss_words(plan, geo: _Geometry, cfg: OverlayConfig) -> int:
    """What ``plan`` loses to transfers the cores cannot overlap, in DDR words of the array.

    * With one weight buffer a chunk streams in only after the core is done with the one
      before, so every chunk costs its compute and its transfer one after the other instead
      of the larger of the two: the smaller of the two is lost, summed over the column's
      chunks.
    * Where a tile's pixel groups do not fit the accumulators the core cannot cut its CONVs
      at the activation parts: the smaller of the slice's transfer and the column's compute
      is charged (row bands, :func:`_bands`, lose less; charging only the first band's
      transfer made ResNet50 at 50 % on aie2-4x4 1.9 % slower, with fewer runs of more
      rows).

    The slowest column of each run counts; the cycles are charged as the words the array's
    read channels would move in them, so that more runs (double-buffered, or with fewer pixel
    groups a tile) are taken where they cost less. ResNet50 on aie2-4x4: layer4.1.conv2 in
    two double-buffered runs instead of one single-buffered, the 1x1 layers on 56x56 in
    seven runs of 8 output rows instead of four of 14."""
    t = cfg.tile
    nr = cfg.ddr.read_channels
    step = cfg.ddr_interval
    rate = _read_rate(cfg)
    taps = geo.kh * geo.kw
    total = 0
    for tile_ranges, _col_rows, chunks, layout in plan:
        groups = _max_groups(tile_ranges, t.pixels)
        worst = 0
        for col_chunks, lay in zip(chunks, layout, strict=True):
            computes = [sum(j1 - j0 for _, j0, j1 in chk.pieces) * taps * groups
                        for chk in col_chunks]
            lost = 0
            if lay[3] == 1:
                for chk, compute in zip(col_chunks, computes, strict=True):
                    lost += min(compute, _cdiv(chk.words, min(2, nr)) * step)
            if groups > t.acc_depth and col_chunks:
                in_w = lay[1]
                arrive = max(len(tile_ranges) * in_w / rate, in_w)
                lost += int(min(arrive, sum(computes)))
            worst = max(worst, lost)
        total += worst
    return int(total * rate)


def _try_plan(geo: _Geometry, col_rows_all: list[list[int]], w_words_row: list[int],
              nnz_row: np.ndarray, n_rsplit: int, n_gsplit: int, R: int, t, qrec: int,
              fused: bool = False):
    """Jobs for ``n_rsplit`` parts of the output rows x ``n_gsplit`` parts of every column's
    block rows, or None if a job does not fit a tile (``fused``: a residual add's operand,
    the convolution's output before the add and the add's records take tile memory too)."""
    b = t.block
    jobs = []
    for rpart in _split_rows(geo.ho, n_rsplit):
        if rpart[1] == rpart[0]:
            continue
        tile_ranges = _rectangles(geo, rpart[0], rpart[1], R, t.pixels)
        max_rows = max(h1 - h0 for h0, h1, _, _ in tile_ranges)
        max_cols = max(w1 - w0 for _, _, w0, w1 in tile_ranges)
        groups = _max_groups(tile_ranges, t.pixels)
        can_split = groups <= t.acc_depth
        taps = geo.kh * geo.kw
        for gp in range(n_gsplit):
            col_rows = []
            for rows in col_rows_all:
                parts = _split_rows(len(rows), n_gsplit)
                a, z = parts[gp]
                col_rows.append(rows[a:z])
            if not any(col_rows):
                continue
            chunks = []
            layout = []
            for rows in col_rows:
                in_w, out_w = _tile_words(geo, max_rows, max_cols, len(rows),
                                          _hdr_slots(geo, t, max_rows, max_cols, fused))
                free = t.dmem_words - _align(in_w, 8 * b) - out_w
                if fused:
                    free -= 2 * out_w + _align(len(rows) * qrec, 8)
                if not rows:
                    chunks.append([])
                    layout.append((0, 0, 0, 2))
                    continue
                ch = None
                nnz = [int(nnz_row[g]) for g in rows]
                for nbuf, split, ramp, down in _TIERS if can_split else _TIERS_WHOLE:
                    cap = (free // nbuf) // (8 * b) * (8 * b)
                    if cap > 0:
                        ch = _chunks(rows, nnz, taps * b, cap, b, qrec, t.bds_per_channel, split,
                                     ramp * RAMP_WORDS, down)
                    if ch is not None:
                        break
                if ch is None or _program_words(ch, nnz_row, b, fused=fused) > t.pmem_words:
                    return None
                chunks.append(ch)
                layout.append((cap, in_w, out_w, nbuf))
            jobs.append((tile_ranges, col_rows, chunks, layout))
    return jobs


def _out_batches(n_rows: int) -> list[tuple[int, int]]:
    """A fused add's batches of a column's ``n_rows`` block rows, ``(first, rows)``: each is
    added and sent as soon as its last row is done (the first holds one row, so the outputs
    start leaving early), at most :data:`OUT_BATCHES` of them."""
    if n_rows <= 1:
        return [(0, n_rows)] if n_rows else []
    rest = _split_rows(n_rows - 1, min(n_rows - 1, OUT_BATCHES - 1))
    return [(0, 1)] + [(1 + a, z - a) for a, z in rest]


def _out_groups(chunks: list[Chunk], n_rows: int) -> list[tuple[int, int]]:
    """The output groups ``(first, rows)`` of a column's ``n_rows`` block rows: each leaves
    (its lock released, one MM2S BD) once its last row is done. The rows a chunk completes
    leave at the chunk's end; a column of fewer chunks than :data:`OUT_BATCHES` (small
    weights: one chunk for every row) also cuts at :func:`_out_batches`, so that its outputs
    do not all wait for its last row. ResNet50's stem and 56x56 layers drained for up to
    11 k cycles after the cores stopped."""
    ends = {ck.first + len(ck.rows) for ck in chunks if ck.rows}
    if len(ends) < OUT_BATCHES:
        ends |= {a + n for a, n in _out_batches(n_rows)}
    out, a = [], 0
    for e in sorted(ends):
        out.append((a, e - a))
        a = e
    return out


def _res_cuts(batches: list[tuple[int, int]], chunks: list[Chunk], n: int
              ) -> list[tuple[int, int]]:
    """A tile's residual in at most ``n`` parts, as ranges of its output ``batches``: cut
    where a weight chunk's rows start (a part never holds rows of a chunk whose weights it
    would hold back on the channel), the first batch on its own if a part is left."""
    starts = {b0: i for i, (b0, _) in enumerate(batches)}
    cuts = sorted({starts[ck.first] for ck in chunks if ck.rows and ck.first in starts} - {0})
    cuts = cuts[:max(0, n - 1)]
    if len(cuts) < n - 1 and len(batches) > 1 and 1 not in cuts:
        cuts = [1, *cuts]
    edges = [0, *cuts, len(batches)]
    while len(edges) - 1 < n:               # parts left: halve the largest
        i = max(range(len(edges) - 1), key=lambda i: edges[i + 1] - edges[i])
        if edges[i + 1] - edges[i] < 2:
            break
        edges.insert(i + 1, (edges[i] + edges[i + 1]) // 2)
    return list(itertools.pairwise(edges))


def _tile_bases(geo: _Geometry, lay: tuple[int, int, int, int],
                rect: tuple[int, int, int, int], n_rows: int, b: int, slots: int = 1
                ) -> dict[str, int]:
    """A conv tile's memory map (word addresses): the input slice at 0 (a row bus packet
    carries one address for every tile of the row), the weight buffers, the output region,
    and for a fused add the convolution's output before the add (``mid``, laid out as the
    output region), the residual (``res``, the same) and the add's requantisation records
    (``qadd``); ``slots``: the output planes' header slots (:func:`_hdr_slots`)."""
    cap, in_max, _, nbuf = lay
    b8 = 8 * b
    h0, h1, w0, w1 = rect
    _, out_w = _tile_words(geo, h1 - h0, w1 - w0, n_rows, slots)
    w0b = _align(in_max, b8)
    w1b = w0b + (cap if nbuf == 2 else 0)
    outb = w1b + cap
    return {"in": 0, "wbuf0": w0b, "wbuf1": w1b, "out": outb, "mid": outb + out_w,
            "res": outb + 2 * out_w, "qadd": _align(outb + 3 * out_w, 8)}


def _build_job(ji: int, geo: _Geometry, layer: ConvLayer, cfg: OverlayConfig,
               row_ranges: list[tuple[int, int]], col_rows: list[list[int]],
               chunks: list[list[Chunk]], layout: list[tuple[int, int, int, int]], rf,
               in_base: int, out_base: int, put, n_act_parts: int,
               wlines: list[np.ndarray],
               mt_use: dict[int, tuple[str, tuple[int, int]]],
               fuse: FusedAdd | None = None, res_base: int | None = None,
               n_res: int = 1) -> ArrayJob:
    t = cfg.tile
    b = t.block
    R, C = cfg.array.rows, cfg.array.cols
    mask = block_mask(layer.weight, b)
    active_rows = _active_rows(row_ranges)
    tile_mask = sum(1 << r for r in active_rows)

    # ---- weight packets: chunk k into buffer k % 2, its first half on bus 0, the second
    # half on bus 1 (both of the column's read channels stream every chunk) --------------------
    shim_bds: dict[int, dict[int, list[BufferDescriptor]]] = {c: {0: [], 1: []}
                                                            for c in range(C)}
    qbytes = _qbytes_all(layer, b, t.qrec_words)
    add_q = _add_records(fuse.add, layer.cout, b, t.qrec_words) if fuse is not None else []
    wpk: dict[tuple[int, int], list[tuple[int, np.ndarray]]] = {}   # (c, bus) -> (k, words)
    # the input channel group of every block column c's cores take, in order, and where each
    # chunk starts in that order (when the cores need what: one block a step)
    seq: dict[int, list[int]] = {c: [] for c in range(C)}
    chunk_at: dict[int, list[int]] = {c: [] for c in range(C)}
    for c in range(C):
        blk = geo.kh * geo.kw * b * b                 # bytes of one block's weight lines
        for k, chk in enumerate(chunks[c]):
            payload = _weight_payload(chk.pieces, chk.q_words, qbytes, wlines, blk, b)
            assert payload.size == chk.words
            capture = mt_use.get(c, ("",))[0] == "capture"
            for bus, (off, n) in enumerate(chk.parts(b)):
                hdr = np.array([n | (1 << rf.col) | (tile_mask << rf.tile)
                                | (capture << rf.mt)], np.uint64)
                wpk.setdefault((c, bus), []).append(
                    (k, np.concatenate([hdr, payload[off:off + n]])))
            chunk_at[c].append(len(seq[c]))
            for g, j0, j1 in chk.pieces:
                seq[c] += np.flatnonzero(mask[g])[j0:j1].tolist()
    # the highest input group the cores of column c have used by each step
    seen = {c: np.maximum.accumulate(seq[c]) if seq[c] else np.zeros(0, np.int64)
            for c in range(C)}

    # ---- activation slices: tile row r's slice, cut by input channel groups into parts
    # alternating between the two read channels of one column (measured on aie2-4x4: 3 % fewer
    # cycles than spreading them over channel 0 of two columns, and every tile equally fast).
    # The parts grow geometrically from one input channel group, so that the cores start
    # early. Each part's header carries its tile-memory address and the lock of its channel
    # slot (ACT_LOCKS[part % slots]): a slot's parts land in order, so its lock counts them,
    # and a core acquires each part just before the first block that reads it -------------
    chans = [(c, ch) for c in range(C) for ch in range(min(2, cfg.ddr.read_channels))]
    per_row = max(1, len(chans) // max(1, len(active_rows)))
    # a fused add's residual parts count on a lock of their own (the last activation lock)
    n_slots = min(per_row, len(ACT_LOCKS) - (fuse is not None))
    res_lock = ACT_LOCKS[n_slots] if fuse is not None else -1
    # (c, ch) -> [(first step that needs it, part, words, [BDs])]
    act_items: dict[tuple[int, int], list[tuple[int, int, int, list[BufferDescriptor]]]] = {}
    part_stage: dict[int, list[int]] = {}         # row -> the channel slot of each part
    # row -> (output row bands, slice row parts, last part each band needs) where the tiles
    # compute in bands (_bands)
    bands_of: dict[int, tuple] = {}
    stage_of: dict[int, np.ndarray] = {}          # row -> input channel group -> its part
    aw = t.addr_bits
    res_parts: dict[tuple[int, int], list[int]] = {}    # tile -> end row of each residual part
    # a column whose chunks all have a weight buffer of their own computes banded tiles
    # band-major (every chunk on a band, then the band's outputs leave: _build_job)
    band_major = [len(chunks[c]) <= layout[c][3] for c in range(C)]
    # the blocks before a second row band starts, at the soonest column: its first chunk,
    # or every chunk band-major
    first_blocks = min((chunk_at[c][1] if len(chunk_at[c]) > 1 and not band_major[c]
                        else len(seq[c]) for c in range(C) if seq[c]), default=0)
    for ri, r in enumerate(active_rows):
        h0, h1, w0, w1 = row_ranges[r]
        rows_in, cols_in = geo.rows_in(h1 - h0), geo.cols_in(w1 - w0)
        a0 = h0 * geo.s - geo.ph                     # first input row (image coordinates)
        y0, y1 = max(a0, 0), min(a0 + rows_in, geo.h)
        b0 = w0 * geo.s - geo.pw                     # first input column
        x0, x1 = max(b0, 0), min(b0 + cols_in, geo.w)
        pad_l, pad_r = x0 - b0, b0 + cols_in - x1
        if not (y1 > y0 and x1 > x0):
            raise ValueError(f"layer {layer.name!r}: tile row {r} reads no input pixel")
        plane = rows_in * cols_in
        nparts = min(per_row * n_act_parts, geo.gin)
        # parts: (first group, end group, first slice row, end slice row); a slice of fewer
        # input channel groups than channels (a stem's one group) is cut by rows instead, so
        # that every channel of the row carries a share of it
        parts = [(g0, g1, 0, rows_in) for g0, g1 in _ramp_split(geo.gin, nparts)]
        if geo.gin < per_row:
            cuts = _row_cuts(rows_in, per_row * n_act_parts // geo.gin, a0, geo.h)
            parts = [(g, g + 1, ya, yb) for g in range(geo.gin) for ya, yb in cuts]
        band = _bands(geo, t, h1 - h0, w1 - w0, a0, n_act_parts) if fuse is None else None
        if band is not None:
            # the cores compute band after band of output rows: the slice comes in row parts
            # of every channel group, stored row-major ([row][group][column]), each part the
            # rows its band needs beyond the bands before
            bands_of[r] = band
            parts = [(0, geo.gin, ya, yb) for ya, yb in band[1]]
        part_stage[r] = [pi % n_slots for pi in range(len(parts))]
        stage_of[r] = np.array([max(pi for pi, (g0, g1, _, _) in enumerate(parts)
                                    if g0 <= g < g1) for g in range(geo.gin)])
        for pi, (g0, g1, ya, yb) in enumerate(parts):
            iy0, iy1 = max(a0 + ya, 0), min(a0 + yb, geo.h)
            ptop, pbot = iy0 - (a0 + ya), (a0 + yb) - iy1
            n_words = (g1 - g0) * (yb - ya) * cols_in
            lock = ACT_LOCKS[pi % n_slots]
            route = (1 + n_words) | (1 << (rf.row + r)) | rf.all_cols(C)
            at = g0 * plane + ya * cols_in if band is None else ya * geo.gin * cols_in
            write = n_words | (at << 16) | (lock << (16 + aw))
            hbase = put(np.array([route, write], dtype=np.uint64))
            sub, in_row, in_plane = geo.sub, geo.sub * geo.in_w, geo.in_h * geo.in_w
            if band is None:
                part = BufferDescriptor(in_base + g0 * in_plane + iy0 * in_row + x0 * sub,
                                        (x1 - x0, iy1 - iy0, g1 - g0), (sub, in_row, in_plane),
                                        (pad_l, ptop, 0), (pad_r, pbot, 0))
                # the first step at which a core of any column uses an input group of it
                need = min((int(np.searchsorted(seen[c], g0)) for c in range(C) if seq[c]),
                           default=0)
            else:
                part = BufferDescriptor(in_base + iy0 * in_row + x0 * sub,
                                        (x1 - x0, geo.gin, iy1 - iy0), (sub, in_plane, in_row),
                                        (pad_l, 0, ptop), (pad_r, 0, pbot))
                # the first band that needs it starts after the earlier bands of chunk 0
                bi = min(i for i, last in enumerate(band[2]) if last >= pi)
                need = bi * first_blocks // len(band[0])
            key = chans[(ri * per_row + pi % n_slots) % len(chans)]
            act_items.setdefault(key, []).append(
                (need, pi, n_words, [BufferDescriptor(hbase, (2,), (1,)), part]))
        if fuse is None:
            continue
        # a fused add's residual: tile (r, c)'s output channel groups over its rectangle, laid
        # out as its output region (a zero word where each header slot is), in up to `n_res`
        # packets on the row bus for that tile alone, each just before the ADDs of the rows
        # it holds (their need: the steps before those ADDs); one channel carries a tile's
        # parts, so they land in order and the residual lock counts them
        for c in range(C):
            rows_c = col_rows[c]
            if not rows_c or not chunks[c]:
                continue
            g0, g1 = rows_c[0], rows_c[-1] + 1
            assert rows_c == list(range(g0, g1)), "a fused add needs contiguous rows"
            nrows, ncols = h1 - h0, w1 - w0
            out_row, out_cg, per_row_hdr = _out_layout(geo, nrows, ncols)
            resb = _tile_bases(geo, layout[c], row_ranges[r], len(rows_c), b)["res"]
            key = chans[(ri * per_row + c % per_row) % len(chans)]
            batches = _out_batches(len(rows_c))
            done_at = np.cumsum([int(mask[g].sum()) for g in rows_c])   # step a row is done
            res_parts[(r, c)] = []
            for q, (a, z) in enumerate(_res_cuts(batches, chunks[c], n_res)):
                ja = batches[a][0]
                jb = batches[z - 1][0] + batches[z - 1][1]
                at = int(done_at[batches[a][0] + batches[a][1] - 1])
                n_words = (jb - ja) * out_cg
                route = (1 + n_words) | (1 << (rf.row + r)) | (1 << (rf.cols + c))
                write = n_words | ((resb + ja * out_cg) << 16) | (res_lock << (16 + aw))
                hbase = put(np.array([route, write], dtype=np.uint64))
                first = res_base + (g0 + ja) * geo.ho * geo.wo + h0 * geo.wo + w0
                if per_row_hdr:
                    part = BufferDescriptor(first, (ncols, nrows, jb - ja),
                                            (1, geo.wo, geo.ho * geo.wo), (1, 0, 0))
                else:
                    part = BufferDescriptor(first, (nrows * ncols, jb - ja),
                                            (1, geo.ho * geo.wo), (1, 0))
                act_items.setdefault(key, []).append(
                    (at, (1 << 20) + 64 * c + q, n_words,
                     [BufferDescriptor(hbase, (2,), (1,)), part]))
                res_parts[(r, c)].append(jb)

    groups_max = _max_groups(row_ranges, t.pixels)
    step = geo.kh * geo.kw * groups_max
    # whether the cores cut CONVs (all tiles' pixel groups fit the accumulators; see below)
    cuts = groups_max <= t.acc_depth
    # ---- each read channel streams its activation parts and weight packets in the order
    # the cores need them; consecutive weight packets are one DDR run ------------------------
    memtile_bds: dict[int, dict[int, list[BufferDescriptor]]] = {}
    prefetch: dict[tuple[int, int], tuple[int, list[tuple[int, int, int]]]] = {}
    mcfg = array_memtile(cfg)
    for c, (use, bases) in mt_use.items():
        for bus in (0, 1):
            words = sum(w.size for _, w in wpk.get((c, bus), []))
            if words and use == "capture":
                memtile_bds.setdefault(c, {})[bus] = _chain(_linear_bds(bases[bus], words))
    # band-major: chunk k starts after band 0 of the chunks before (the fewest bands of a row)
    min_bands = min((len(bd[0]) for bd in bands_of.values()), default=1)
    for c in range(C):
        use_c = mt_use.get(c, ("",))[0]
        replay = use_c in ("replay", "prefetched")
        per = min_bands if band_major[c] else 1
        for ch in (0, 1):
            # by the latest cycle each can start streaming and still arrive in time: when
            # the cores need it (a block takes `step` cycles) less its time on the channel
            # (a bus's weight packets stay in chunk order: the tiles' BDs take them so)
            wl = wpk.get((c, ch), [])
            late = [(chunk_at[c][k] + (W_HALF_SLACK * chunks[c][k].blocks_in_first_part(b)
                                       if ch == 1 and cuts else 0)) * step / per
                    for k, w in wl]
            for i in range(len(late) - 2, -1, -1):
                late[i] = min(late[i], late[i + 1])
            # ... and an activation part never waits behind the packet of a chunk whose buffer
            # the cores free only after a chunk that needs the part (no deadlock)
            nbuf = layout[c][3]
            acts = sorted((need * step, pi, need, bds)
                          for need, pi, n, bds in act_items.get((c, ch), []))
            items: list[tuple[int, object]] = []
            for i, (k, w) in enumerate(wl):
                later = []
                for a in acts:
                    if a[0] <= late[i] or (k >= nbuf and chunk_at[c][k - nbuf + 1] > a[2]):
                        items.append((1, a[3]))
                    else:
                        later.append(a)
                acts = later
                items.append((0, w))
            items += [(1, a[3]) for a in acts]
            # consecutive weight packets are one DDR run; a column replaying its weights from
            # the memtile reads only a token from DDR instead, a header-only packet for the
            # memtile whose landing releases the memtile lock the run's replay acquires, so
            # that the replayed weights leave the memtile in the order of this stream (not
            # all at once, taking the tiles' memory ports from the activation parts)
            grouped: list[tuple[int, list]] = []
            for is_act, it in items:
                if not is_act and grouped and not grouped[-1][0]:
                    grouped[-1][1].append(it)
                else:
                    grouped.append((is_act, it if is_act else [it]))
            runs = [sum(x.size for x in it) for is_act, it in grouped if not is_act]
            n_groups = 0
            if use_c == "prefetched" and wl:
                # the previous layer's last job brings this bus's stream into the memtile:
                # it lies in DDR in one piece, after the headers of the wrapper packets (only
                # the `mt` bit: no tile sees them) that carry it, 65535 words at most each
                stream = np.concatenate([w for _, w in wl])
                src = put(stream)
                pieces = []
                for off in range(0, stream.size, 0xFFFF):
                    n = min(0xFFFF, stream.size - off)
                    hdr = put(np.array([n | (1 << rf.mt)], np.uint64))
                    pieces.append((hdr, src + off, n))
                prefetch[(c, ch)] = (mt_use[c][1][ch], pieces)
            if replay and runs:
                replay_bds, n_groups = _replay_bds(mt_use[c][1][ch], runs, ch, mcfg,
                                                   _token_word(cfg))
                memtile_bds.setdefault(c, {})[mcfg.s2mm + ch] = replay_bds
                memtile_bds[c][ch] = _chain([BufferDescriptor(
                    _token_word(cfg), (1,), (1,),
                    release=LockAction(MT_LOCKS[ch], 1))] * n_groups)
            bds: list[BufferDescriptor] = []
            n_run = 0
            for is_act, it in grouped:
                if is_act:
                    bds += it
                    continue
                if not replay:
                    bds += _linear_bds(put(np.concatenate(it)), sum(x.size for x in it))
                elif n_run < n_groups:
                    bds += _linear_bds(put(np.array([1 << rf.mt], np.uint64)), 1)
                n_run += 1
            if len(bds) > cfg.ddr.bds_per_channel:
                raise _ShimBdsShort(f"layer {layer.name!r}: column {c} read channel {ch} "
                                    f"needs {len(bds)} BDs, the shim has "
                                    f"{cfg.ddr.bds_per_channel}")
            shim_bds[c][ch] = _chain(bds)

    # ---- tiles ---------------------------------------------------------------------------------
    tiles: list[TilePlan] = []
    for r in range(R):
        for c in range(C):
            tp = TilePlan(r, c, row_ranges[r])
            h0, h1, w0, w1 = row_ranges[r]
            rows = col_rows[c]
            if h1 == h0 or w1 == w0 or not rows:
                # an idle tile of an active row still takes the row's activation parts, so
                # that its locks end the job as they started
                p = Program()
                if r in part_stage:
                    _take_parts(p, part_stage[r], 0, len(part_stage[r]) - 1)
                tp.program = p.halt().words
                tiles.append(tp)
                continue
            nrows, ncols = h1 - h0, w1 - w0
            cap, _, _, nbuf = layout[c]
            band = bands_of.get(r)
            # band-major (every chunk on a band of output rows, then that band leaves): where
            # the tile computes in bands and every chunk has a buffer of its own, so that the
            # outputs stream out while the slice streams in
            bmajor = band is not None and band_major[c]
            hslots = _hdr_slots(geo, t, nrows, ncols, fuse is not None)
            in_w, out_w = _tile_words(geo, nrows, ncols, len(rows), hslots)
            tb = _tile_bases(geo, layout[c], row_ranges[r], len(rows), b, hslots)
            inb = tb["in"]
            wbuf = (tb["wbuf0"], tb["wbuf1"])
            outb = tb["out"]
            rows_in, cols_in = geo.rows_in(nrows), geo.cols_in(ncols)
            out_row, out_cg, per_row = _out_layout(geo, nrows, ncols, hslots)
            bands = band[0] if band is not None else [(0, nrows)]
            if bmajor and not per_row:
                assert len(bands) <= hslots
            # band bi's place in a block row's output plane (its header slot, or its first
            # row's for one header per row)
            boff = [o0 * out_row + (bi if bmajor and not per_row else 0)
                    for bi, (o0, _) in enumerate(bands)]
            tp.regions = {"in": (inb, in_w), "wbuf0": (wbuf[0], cap), "wbuf1": (wbuf[1], cap),
                          "out": (outb, out_w)}
            convb = outb                     # where the CONVs write
            if fuse is not None:
                convb = tb["mid"]
                tp.regions |= {"mid": (tb["mid"], out_w), "res": (tb["res"], out_w),
                               "qadd": (tb["qadd"], len(rows) * t.qrec_words)}
                recs = np.concatenate([add_q[g] for g in rows])
                for k, wv in enumerate(_words_of(recs, b)):
                    tp.dm[tb["qadd"] + k] = int(wv)
                assert tb["qadd"] + len(rows) * t.qrec_words <= t.dmem_words
            assert outb + out_w <= t.dmem_words
            for j, g in enumerate(rows):
                plane = out_base + g * geo.ho * geo.wo
                if per_row:
                    for i in range(nrows):
                        addr = plane + (h0 + i) * geo.wo + w0
                        tp.dm[outb + j * out_cg + i * out_row] = ncols | (addr << 16)
                elif bmajor:
                    for bi, (o0, o1) in enumerate(bands):
                        addr = plane + (h0 + o0) * geo.wo
                        tp.dm[outb + j * out_cg + boff[bi]] = ((o1 - o0) * ncols) | (addr << 16)
                else:
                    addr = plane + h0 * geo.wo
                    tp.dm[outb + j * out_cg] = (nrows * ncols) | (addr << 16)
            # a slice that comes in row bands is stored row-major: [row][group][column]
            in_row, in_cg = ((cols_in, rows_in * cols_in) if r not in bands_of
                             else (geo.gin * cols_in, cols_in))
            params = {"IN_BASE": inb, "IN_ROW": in_row, "IN_CG": in_cg,
                      "OUT_ROW": out_row, "OUT_CG": out_cg, "HO": nrows, "WO": ncols,
                      "KH": geo.kh, "KW": geo.kw, "STRIDE": geo.s, "SHIFT": layer.shift}
            if fuse is not None:
                params |= _add_muls(fuse)
            for key, v in params.items():
                if not param_range(Param[key], t).accepts(v):
                    raise ValueError(f"layer {layer.name!r}: tile ({r},{c}) parameter {key} "
                                     f"= {v} is outside what the tile accepts "
                                     f"({param_range(Param[key], t).describe()})")
            p = Program().setps(**params)
            stage = stage_of[r]                      # input group -> its part
            slots = part_stage[r]                    # part -> its channel slot (lock)
            got = 0                                  # parts acquired so far (in order)
            # a CONV may stop (HOLD) where its next block needs a part not acquired yet, and
            # go on (ACC) after the acquire, if the tile's pixel groups fit the accumulators
            can_cut = nrows * _cdiv(ncols, t.pixels) <= t.acc_depth
            n_out = 0                                # chunks that completed rows so far
            res_got = 0                              # residual parts acquired so far
            n_done = 0                               # block rows completed so far
            batches = _out_batches(len(rows)) if fuse is not None else []
            out_groups = _out_groups(chunks[c], len(rows)) if fuse is None else batches
            mid_ends = set() if fuse is not None else {a + n for a, n in out_groups} - {
                ck.first + len(ck.rows) for ck in chunks[c] if ck.rows}

            tp.bands, tp.band_major = (len(band[0]) if band else 1), bmajor
            # per output packet group: (first word, words of a block row, block rows)
            out_bds: list[tuple[int, int, int]] = []
            if bmajor:
                assert band is not None
                _, _, last_part = band
                for bi, (o0, o1) in enumerate(bands):
                    got = _take_parts(p, slots, got, last_part[bi])
                    for k, chk in enumerate(chunks[c]):
                        buf = k % nbuf
                        if bi == 0:
                            for part in range(len(chk.parts(b))):
                                p.acquire(LOCK_WFULL[buf][part])
                        p.setps(Q_PTR=wbuf[buf], W_PTR=wbuf[buf] + chk.q_words,
                                OUT_BASE=convb + chk.first * out_cg + 1 + boff[bi],
                                IN_BASE=inb + o0 * geo.s * params["IN_ROW"], HO=o1 - o0)
                        for g, j0, j1 in chk.pieces:
                            assert (j0, j1) == (0, int(mask[g].sum()))
                            p.conv(np.flatnonzero(mask[g]).tolist(), relu=layer.relu)
                    p.nop(fence=True)
                    p.release(LOCK_OFULL[(n_out + r) % 2])
                    n_out += 1
                    out_bds.append((outb + boff[bi], (o1 - o0) * out_row + (not per_row),
                                    len(rows)))
                for k, chk in enumerate(chunks[c]):
                    for part in range(len(chk.parts(b))):
                        p.release(LOCK_WEMPTY[k % nbuf][part])
            pk = out_cg if per_row else 1 + nrows * ncols    # a block row's packet words
            out_bds += [] if bmajor else [(outb + first * out_cg, pk, nb)
                                          for first, nb in out_groups]
            for k, chk in enumerate(chunks[c] if not bmajor else []):
                buf, nparts = k % nbuf, len(chk.parts(b))
                if band is not None:
                    # every block row of the chunk on each band of output rows in turn, each
                    # band once the slice rows it needs have landed (whole rows: no pieces)
                    for part in range(nparts):
                        p.acquire(LOCK_WFULL[buf][part])
                    for bi, (o0, o1) in enumerate(bands):
                        got = _take_parts(p, slots, got, band[2][bi])
                        p.setps(Q_PTR=wbuf[buf], W_PTR=wbuf[buf] + chk.q_words,
                                OUT_BASE=convb + chk.first * out_cg + 1 + boff[bi],
                                IN_BASE=inb + o0 * geo.s * params["IN_ROW"], HO=o1 - o0)
                        for g, j0, j1 in chk.pieces:
                            assert (j0, j1) == (0, int(mask[g].sum()))
                            p.conv(np.flatnonzero(mask[g]).tolist(), relu=layer.relu)
                            if bi == len(bands) - 1:
                                n_done += 1
                                if n_done in mid_ends:
                                    p.nop(fence=True)
                                    p.release(LOCK_OFULL[(n_out + r) % 2])
                                    n_out += 1
                    n_out += _free_chunk(p, buf, nparts,
                                         LOCK_OFULL[(n_out + r) % 2] if chk.rows else None)
                    continue
                if not can_cut:
                    # the parts of every group chunks 0..k use
                    end = chunk_at[c][k + 1] if k + 1 < len(chunks[c]) else len(seq[c])
                    got = _take_parts(p, slots, got, int(stage[seen[c][end - 1] if end else 0]))
                # with cuts, the core starts on the blocks of the chunk's first part and
                # acquires the second part just before its first block
                wgot = 1 if can_cut else nparts
                hb = chk.blocks_in_first_part(b) if wgot < nparts else 0
                for part in range(wgot):
                    p.acquire(LOCK_WFULL[buf][part])
                p.setps(Q_PTR=wbuf[buf], W_PTR=wbuf[buf] + chk.q_words,
                        OUT_BASE=convb + chk.first * out_cg + 1)
                bi = 0                                   # blocks of the chunk before piece i
                for i, (g, j0, j1) in enumerate(chk.pieces):
                    n = int(mask[g].sum())
                    blocks = np.flatnonzero(mask[g])[j0:j1].tolist()
                    a = 0
                    for e in range(len(blocks) + 1):
                        need_w = e < len(blocks) and wgot < nparts and bi + e >= hb
                        if e < len(blocks) and stage[blocks[e]] < got and not need_w:
                            continue
                        if e > a:           # blocks[a:e] need no more parts
                            last = e == len(blocks)
                            p.conv(blocks[a:e], relu=layer.relu,
                                   hold=not last or j1 < n, acc=a > 0 or j0 > 0)
                            if not last:    # the CONV's record again for the rest
                                p.setps(Q_PTR=wbuf[buf] + i * t.qrec_words)
                        if need_w:
                            while wgot < nparts:
                                p.acquire(LOCK_WFULL[buf][wgot])
                                wgot += 1
                        if e < len(blocks):
                            got = _take_parts(p, slots, got, int(stage[blocks[e]]))
                        a = e
                    if not blocks:
                        p.conv([], relu=layer.relu, hold=False, acc=False)
                    bi += len(blocks)
                    if j1 == n:
                        n_done += 1
                        if n_done in mid_ends:
                            # an output batch ends inside the chunk: it leaves now, while
                            # the chunk's other rows compute
                            p.nop(fence=True)
                            p.release(LOCK_OFULL[(n_out + r) % 2])
                            n_out += 1
                        if fuse is not None and n_out < len(batches) and \
                                sum(batches[n_out]) == n_done:
                            # a fused add's batch (the rows just done): CONV output +
                            # residual, then its release to MM2S; the CONVs' registers back
                            first, nb = batches[n_out]
                            ends = res_parts[(r, c)]     # part i: rows [ends[i-1], ends[i])
                            n_new = 0
                            while res_got < len(ends) and (ends[res_got - 1] if res_got else 0) \
                                    < first + nb:
                                res_got += 1
                                n_new += 1
                            if n_new:
                                p.acquire(res_lock, n_new)
                            p.setps(IN_BASE=tb["mid"] + 1, IN_ROW=out_row, IN_CG=out_cg,
                                    B_BASE=tb["res"] + 1,
                                    OUT_BASE=outb + first * out_cg + 1,
                                    Q_PTR=tb["qadd"] + first * t.qrec_words,
                                    SHIFT=fuse.add.shift, STRIDE=1)
                            for j in range(first, first + nb):
                                p.add(j, relu=fuse.add.relu, fence=j == first)
                            p.nop(fence=True)
                            p.release(LOCK_OFULL[(n_out + r) % 2])
                            n_out += 1
                            p.setps(IN_BASE=inb, IN_ROW=cols_in, IN_CG=rows_in * cols_in,
                                    SHIFT=layer.shift, STRIDE=geo.s,
                                    OUT_BASE=convb + (first + nb) * out_cg + 1,
                                    Q_PTR=wbuf[buf] + (i + 1) * t.qrec_words)
                while wgot < nparts:
                    p.acquire(LOCK_WFULL[buf][wgot])
                    wgot += 1
                n_out += _free_chunk(p, buf, nparts, LOCK_OFULL[(n_out + r) % 2]
                                     if fuse is None and chk.rows else None)
            # every part, needed or not: a job leaves each lock as it found it (the next job's
            # configuration sets only the locks it starts from)
            got = _take_parts(p, slots, got, len(slots) - 1)
            tp.program = p.halt().words
            assert len(tp.program) <= _program_words(chunks[c], mask.sum(axis=1), b,
                                                     len(slots), fuse is not None,
                                                     len(band[0]) if band else 1)
            if len(tp.program) > t.pmem_words:
                raise _ProgramTooLong(f"layer {layer.name!r}: tile ({r},{c}) program has "
                                 f"{len(tp.program)} words, program memory holds "
                                 f"{t.pmem_words}")
            tp.locks = {lk: 1 for pair in LOCK_WEMPTY for lk in pair}
            for bus in (0, 1):
                wl = [BufferDescriptor(wbuf[k % nbuf] + chk.parts(b)[bus][0],
                                       (b, chk.parts(b)[bus][1] // b), (1, b),
                                       acquire=LockAction(LOCK_WEMPTY[k % nbuf][bus], 1),
                                       release=LockAction(LOCK_WFULL[k % nbuf][bus], 1))
                      for k, chk in enumerate(chunks[c]) if bus < len(chk.parts(b))]
                ol = [BufferDescriptor(a, (n, nb), (1, out_cg),
                                       acquire=LockAction(LOCK_OFULL[bus], 1))
                      for a, n, nb in out_bds[(bus + r) % 2::2]]
                tp.bds[CH_W[bus]] = _chain(wl)
                tp.bds[CH_OUT[bus]] = _chain(ol)
            tiles.append(tp)
    return ArrayJob(ji, tiles, shim_bds, col_rows, row_ranges, chunks, memtile_bds,
                    {c: use for c, (use, _) in mt_use.items()}, prefetch)


def _weight_payload(pieces: list[tuple[int, int, int]], q_words: int,
                    qbytes: list[np.ndarray], wlines: list[np.ndarray], blk: int, b: int
                    ) -> np.ndarray:
    """The words of a weight packet: the requantisation record of each piece ``(block row,
    first block, end block)`` padded to ``q_words`` words, then the pieces' weight lines
    (``blk`` bytes a block)."""
    body = [np.concatenate([qbytes[g] for g, _, _ in pieces]).view(np.uint8)]
    pad_q = q_words * b - sum(qbytes[g].size for g, _, _ in pieces)
    if pad_q:
        body.append(np.zeros(pad_q, dtype=np.uint8))
    body += [wlines[g][j0 * blk:j1 * blk] for g, j0, j1 in pieces]
    return _words_of(np.concatenate(body), b)


def _add_muls(fuse: FusedAdd) -> dict[str, int]:
    """A fused add's multipliers as ADD parameters: operand a is the CONV's output
    (``IN_BASE``), b the residual (``B_BASE``)."""
    ma, mb = fuse.add.mul_a, fuse.add.mul_b
    return {"MUL_A": ma if fuse.conv_operand == 0 else mb,
            "MUL_B": mb if fuse.conv_operand == 0 else ma}


def _replay_bds(base: int, runs: list[int], bus: int, mcfg, scratch: int
                ) -> tuple[list[BufferDescriptor], int]:
    """The memtile MM2S BDs replaying a bus's weight stream (from memtile word ``base``, its
    DDR runs ``runs`` words each) and how many tokens pace them: one BD group per run, each
    acquiring the bus's memtile lock once, as many as the channel's BDs allow (the last
    group then takes the remaining runs too)."""
    assert base + sum(runs) <= scratch
    for n_groups in range(len(runs), 0, -1):
        sizes = [*runs[:n_groups - 1], sum(runs[n_groups - 1:])]
        out: list[BufferDescriptor] = []
        off = base
        for n in sizes:
            piece = _linear_bds(off, n)
            first = piece[0]
            piece[0] = BufferDescriptor(first.base, first.sizes, first.strides,
                                        acquire=LockAction(MT_LOCKS[bus], 1))
            out += piece
            off += n
        if len(out) <= mcfg.bds_per_channel:
            return _chain(out), n_groups
    raise ValueError(f"a weight stream of {sum(runs)} words needs more than the memtile's "
                     f"{mcfg.bds_per_channel} BDs a channel")


def _active_rows(row_ranges: list[tuple[int, int, int, int]]) -> list[int]:
    """The tile rows with a non-empty output rectangle."""
    return [r for r, (h0, h1, w0, w1) in enumerate(row_ranges) if h1 > h0 and w1 > w0]


def _memtile_plan(jobs_spec, cfg: OverlayConfig, prefetch_at: dict[int, int] | None = None
                  ) -> list[dict[int, tuple[str, tuple[int, int]]]]:
    """Per job, the columns that capture their weight streams into the memtile or replay them
    from it: ``{column: ("capture" | "replay" | "prefetched", (memtile word of bus 0's
    stream, of bus 1's))}``.

    Two runs stream a column the same weight packets when they give it the same chunks and
    the same active tile rows (runs over parts of the output rows). The first run of such a
    group captures them (the packets read from DDR also go into the memtile, headers and all)
    and the others replay them: their weights come from the memtile at a word a cycle on
    each column bus, and the column's DDR channels carry only activations. A group whose
    streams do not fit what is left of the memtile reads them from DDR every time.

    With ``prefetch_at`` (per column, the first memtile word the previous layer's last job
    leaves free; streams go from there on) the first job's streams that fit are
    ``"prefetched"``: the previous layer brings them and this layer replays them from its
    first run on."""
    b = cfg.tile.block
    mt = array_memtile(cfg)
    if mt.s2mm < 2 or mt.mm2s < 2:
        return [{} for _ in jobs_spec]
    capacity = _token_word(cfg)                    # below the tokens' landing word
    keys = []
    for tile_ranges, _col_rows, chunks, _layout in jobs_spec:
        rows = tuple(_active_rows(tile_ranges))
        keys.append([(c, rows, tuple((tuple(k.pieces), k.q_words, k.w_words) for k in ch))
                     if ch else None for c, ch in enumerate(chunks)])
    count: dict = {}
    for per in keys:
        for key in per:
            if key is not None:
                count[key] = count.get(key, 0) + 1
    used = [(prefetch_at or {}).get(c, 0) for c in range(cfg.array.cols)]
    stored: dict = {}
    plan: list[dict[int, tuple[str, tuple[int, int]]]] = []
    for ji, ((_tr, _cr, chunks, _lay), per) in enumerate(zip(jobs_spec, keys, strict=True)):
        mine: dict[int, tuple[str, tuple[int, int]]] = {}
        pre = ji == 0 and prefetch_at is not None
        for c, key in enumerate(per):
            if key is None or (count[key] < 2 and not pre):
                continue
            if key in stored:
                mine[c] = ("replay", stored[key])
                continue
            words = [sum(1 + part[1] for k in chunks[c] for part in k.parts(b)[bus:bus + 1])
                     for bus in (0, 1)]
            if used[c] + sum(words) > capacity:
                continue
            stored[key] = (used[c], used[c] + words[0])
            used[c] += sum(words)
            mine[c] = ("prefetched" if pre else "capture", stored[key])
        plan.append(mine)
    return plan


def memtile_end(job: ArrayJob, cfg: OverlayConfig) -> dict[int, int]:
    """Per column, the end of the memtile words ``job`` reads or writes (its captured and
    replayed streams; the tokens' landing word, the memtile's last, not counted)."""
    from tilewright.sim.dm_model import bd_addresses

    scratch = _token_word(cfg)
    end: dict[int, int] = {}
    for c, per in job.memtile_bds.items():
        for bds in per.values():
            for bd in bds:
                addrs, ok = bd_addresses(bd)
                addrs = addrs[ok & (addrs != scratch)]
                if addrs.size:
                    end[c] = max(end.get(c, 0), int(addrs.max()) + 1)
    return end


def add_prefetch(job: ArrayJob, nxt: ArrayJob, cfg: OverlayConfig) -> bool:
    """Make ``job`` (a layer's last run) bring the weight streams of ``nxt`` (the next
    layer's one run, compiled with ``prefetch_at``) into the memtiles: each column read
    channel ``k`` reads, after everything else, the wrapper packets of bus ``k``'s stream
    (:attr:`ArrayJob.prefetch`), which memtile S2MM ``k`` writes where ``nxt`` replays them
    from (the wrapper header to the tokens' landing word). Changes nothing and returns False
    if a BD table would overflow."""
    mcfg = array_memtile(cfg)
    scratch = _token_word(cfg)
    shim: dict[tuple[int, int], list[BufferDescriptor]] = {}
    mt: dict[tuple[int, int], list[BufferDescriptor]] = {}
    for (c, bus), (base, pieces) in sorted(nxt.prefetch.items()):
        rd = list(job.shim_bds.get(c, {}).get(bus, []))
        wr = list(job.memtile_bds.get(c, {}).get(bus, []))
        off = base
        for hdr, src, n in pieces:
            rd += [BufferDescriptor(hdr, (1,), (1,)), *_linear_bds(src, n)]
            wr += [BufferDescriptor(scratch, (1,), (1,)), *_linear_bds(off, n)]
            off += n
        if len(rd) > cfg.ddr.bds_per_channel or len(wr) > mcfg.bds_per_channel:
            return False
        shim[(c, bus)], mt[(c, bus)] = _chain(rd), _chain(wr)
    for (c, bus), bds in shim.items():
        job.shim_bds.setdefault(c, {})[bus] = bds
        job.memtile_bds.setdefault(c, {})[bus] = mt[(c, bus)]
    return True


def _weight_lines_all(layer: ConvLayer, b: int) -> list[np.ndarray]:
    """Per block row, the uint8 bytes of its non-zero weight lines (tile_compiler layout)."""
    w = layer.weight
    cout, cin, kh, kw = w.shape
    gout, gin = _cdiv(cout, b), _cdiv(cin, b)
    full = np.zeros((gout * b, gin * b, kh, kw), dtype=np.int8)
    full[:cout, :cin] = w
    mask = block_mask(w, b)
    # (block row, block column, kh, kw, out lane, in lane): a block's lines in order
    blocks = full.reshape(gout, b, gin, b, kh, kw).transpose(0, 2, 4, 5, 1, 3)
    return [np.ascontiguousarray(blocks[g, np.flatnonzero(mask[g])]).reshape(-1).view(np.uint8)
            for g in range(gout)]


def _add_records(add: AddLayer, c: int, b: int, qrec_words: int) -> list[np.ndarray]:
    """Per channel group, an add's requantisation record (its biases and multipliers)."""
    from tilewright.sw.tile_compiler import _int_vector

    bias = _int_vector(add.bias, f"layer {add.name!r}: bias", c)
    mult = _int_vector(add.mult, f"layer {add.name!r}: mult", c)
    return _qbytes_all(ConvLayer(np.zeros((c, 1, 1, 1), np.int8), bias, mult, 0, name="q"),
                       b, qrec_words)


def _qbytes_all(layer: ConvLayer, b: int, qrec_words: int) -> list[np.ndarray]:
    """Per block row, its requantisation record (``qrec_words`` words)."""
    cout = layer.cout
    out = []
    for g in range(_cdiv(cout, b)):
        rec = np.zeros(qrec_words * b, dtype=np.uint8)
        n = max(0, min(b, cout - g * b))
        bb = np.zeros(b, dtype="<i4")
        mm = np.zeros(b, dtype="<i4")
        bb[:n] = layer.bias[g * b:g * b + n]
        mm[:n] = layer.mult[g * b:g * b + n]
        rec[:4 * b] = bb.view(np.uint8)
        rec[4 * b:8 * b] = mm.view(np.uint8)
        out.append(rec)
    return out



# Streamed runs ------------------------------------------------------------------------------------

#: Input slots of a streamed job (:func:`_build_stream_job`): the core computes on one while
#: the column buses fill the other.
STREAM_SLOTS = 2
#: A streamed block reads the halo rows of a kernel taller than its stride again; at most
#: this many times the block's own input rows.
STREAM_REREAD = 2
#: A layer that would take several runs tries this many streamed runs at most (a fused
#: add's outputs, scratch and residual take tile memory: ResNet50's layer1 adds take 2).
STREAM_RUNS_MAX = 4
#: A streamed fused add's residual slots: ``STREAM_RES_LOCKS[0][s]`` full (its S2MM BD
#: releases it), ``STREAM_RES_LOCKS[1][s]`` empty (the core releases it after the ADDs).
STREAM_RES_LOCKS = ((11, 12), (13, 14))


def _build_stream_job(ji: int, geo: _Geometry, layer: ConvLayer, cfg: OverlayConfig, rf,
                      in_base: int, out_base: int, put, wlines: list[np.ndarray],
                      nnz_row: np.ndarray, out_rows: tuple[int, int],
                      fuse: FusedAdd | None = None, res_base: int | None = None
                      ) -> tuple[ArrayJob, int] | None:
    """One overlay run of a convolution over the output rows ``out_rows`` that streams its
    input through tile memory and its rough cycle count, or None if it does not fit.

    The array is used the other way round from :func:`_build_job`: tile rows split the
    output channels (block rows, balanced by non-zero blocks; contiguous ranges with a fused
    add) and keep their weights resident (one packet per read channel on the row bus to the
    activation writer, once), columns split the output rows. Each column's rows come in row
    blocks of every input channel group (a kernel taller than its stride reads the halo rows
    of each block again), broadcast down the column (half the channel groups on each column
    bus, so both of the column's read channels carry every block) into :data:`STREAM_SLOTS`
    input slots of every tile of the column, through the S2MM channels' BDs with a
    full/empty lock pair per slot and bus (the weight buffers' locks): a block waits in the
    DDR channel until the cores have freed its slot, so a layer whose input is far larger
    than a tile runs in one run (or a few), its transfers overlapping the compute, instead of
    many runs that each start and drain. The outputs stay in tile memory (one packet per
    block row and row block, its header slot before it) and leave after each row block.
    With ``fuse``, each tile's residual of a row block (its channel groups over the block's
    rows) comes down the column bus of the block's parity to that tile alone, into one of
    two residual slots (locks :data:`STREAM_RES_LOCKS`); the CONVs write a scratch block
    that the block's ADDs add to it.
    """
    t = cfg.tile
    b = t.block
    R, C = cfg.array.rows, cfg.array.cols
    aw = t.addr_bits
    if geo.gin < 2 or cfg.ddr.read_channels < 2:
        return None
    mask = block_mask(layer.weight, b)
    wo = geo.wo
    taps = geo.kh * geo.kw
    row_rows = (_balance(nnz_row, R) if fuse is None
                else _balance_contiguous(nnz_row * taps, R, 2))
    h0, h1 = out_rows
    col_out = [(h0 + y0, h0 + y1) for y0, y1 in _split_rows(h1 - h0, C)]
    act_rows = [r for r in range(R) if row_rows[r]]
    act_cols = [c for c in range(C) if col_out[c][1] > col_out[c][0]]
    tile_mask = sum(1 << r for r in act_rows)
    col_mask = sum(1 << (rf.cols + c) for c in act_cols)
    qbytes = _qbytes_all(layer, b, t.qrec_words)
    add_q = (_add_records(fuse.add, layer.cout, b, t.qrec_words) if fuse is not None else [])
    gh = geo.gin // 2
    halves = ((0, gh), (gh, geo.gin))
    in_row, in_plane = geo.sub * geo.in_w, geo.in_h * geo.in_w
    cols_in = geo.cols_in(wo)                          # every block: the whole padded width
    pad_l = geo.pw
    x_n = min(geo.w, cols_in - pad_l)                  # input columns read (the rest padding)
    pad_r = cols_in - pad_l - x_n

    # per tile row: the resident weights (records, then lines) and the tile memory layout
    wpay: dict[int, np.ndarray] = {}
    q_words: dict[int, int] = {}
    blk = taps * b * b                                 # bytes of one block's weight lines
    for r in act_rows:
        q_words[r] = _align(len(row_rows[r]) * t.qrec_words, 8)
        wpay[r] = _weight_payload([(g, 0, int(nnz_row[g])) for g in row_rows[r]], q_words[r],
                                  qbytes, wlines, blk, b)
    nrow_max = max(len(row_rows[r]) for r in act_rows)

    def fixed(r: int, kb: int) -> int:
        """Tile words besides the outputs: weights, input slots, a fused add's records,
        scratch block and residual slots."""
        n = _align(wpay[r].size, 8) + STREAM_SLOTS * _align(geo.rows_in(kb) * cols_in * geo.gin,
                                                            8)
        if fuse is not None:
            n += _align(len(row_rows[r]) * t.qrec_words, 8) + 3 * len(row_rows[r]) * kb * wo
        return n

    # the row block: 2 slots of kb rows of every input group, the weights and the outputs
    # of the column's rows must fit; of those, the one with the least cycles by a rough
    # count: the larger of the busiest core's issue cycles and the busiest read channel's,
    # plus the first block's transfer and the last block's compute (and a little for the
    # traffic)
    rows_max = max(y1 - y0 for y0, y1 in col_out)
    per_row = max(sum(int(nnz_row[g]) * taps + 1 for g in row_rows[r]) for r in act_rows) \
        * _cdiv(wo, t.pixels)
    step = cfg.ddr_interval
    kb, best = None, None
    for cand in range(1, rows_max + 1):
        nblk = _cdiv(rows_max, cand)
        # halo rows read again: at most STREAM_REREAD times the input rows
        if geo.rows_in(cand) > STREAM_REREAD * cand * geo.s:
            continue
        # BDs: a read channel's weight packets and per block a header and a payload (and a
        # fused add's residual packets on every other block); a tile's S2MM channel one per
        # block and residual
        res_bds = _cdiv(nblk, 2) * len(act_rows) * 2 if fuse is not None else 0
        if (3 * _cdiv(len(act_rows), len(act_cols)) + 2 * nblk + res_bds
                > cfg.ddr.bds_per_channel
                or nblk + (fuse is not None) * _cdiv(nblk, 2) > t.bds_per_channel):
            continue
        need = max(fixed(r, cand) + len(row_rows[r]) * (rows_max * wo + nblk)
                   for r in act_rows)
        if need > t.dmem_words:
            continue
        half = geo.rows_in(cand) * cols_in * (geo.gin - gh)
        if fuse is not None:
            half += nrow_max * cand * wo * len(act_rows) // 2
        outs = sum(len(row_rows[r]) for r in act_rows) * rows_max * wo   # a column's
        cost = (max(per_row * rows_max, (half * nblk + 2 * nblk) * step,
                    outs * step // cfg.ddr.write_channels)
                + half * step + per_row * cand)
        key = cost + half * nblk * step // 16          # and, among those, less traffic
        if best is None or key < best[0]:
            kb, best = cand, (key, cost)
    if kb is None:
        return None

    tiles: list[TilePlan] = []
    for r in range(R):
        for c in range(C):
            y0, y1 = col_out[c]
            tp = TilePlan(r, c, (y0, y1, 0, wo))
            rows = row_rows[r]
            if r not in act_rows or c not in act_cols:
                tp.program = Program().halt().words
                tiles.append(tp)
                continue
            nr = len(rows)
            blocks = [(a, min(a + kb, y1)) for a in range(y0, y1, kb)]
            slot_w = _align(geo.rows_in(kb) * cols_in * geo.gin, 8)
            sb = [_align(wpay[r].size, 8) + s * slot_w for s in range(STREAM_SLOTS)]
            top = sb[-1] + slot_w
            tp.regions = {"wbuf0": (0, wpay[r].size), "in": (sb[0], STREAM_SLOTS * slot_w)}
            if fuse is not None:
                qadd, mid = top, top + _align(nr * t.qrec_words, 8)
                rs = [mid + (1 + s) * nr * kb * wo for s in range(2)]
                top = rs[1] + nr * kb * wo
                tp.regions |= {"qadd": (qadd, nr * t.qrec_words), "mid": (mid, nr * kb * wo),
                               "res": (rs[0], 2 * nr * kb * wo)}
                recs = np.concatenate([add_q[g] for g in rows])
                for i, wv in enumerate(_words_of(recs, b)):
                    tp.dm[qadd + i] = int(wv)
            outb = top
            out_cg = (y1 - y0) * wo + len(blocks)
            offs = list(itertools.accumulate((1 + (e - a) * wo for a, e in blocks),
                                             initial=0))
            assert outb + nr * out_cg <= t.dmem_words
            tp.regions["out"] = (outb, nr * out_cg)
            for j, g in enumerate(rows):
                for k, (a, e) in enumerate(blocks):
                    addr = out_base + g * geo.ho * wo + a * wo
                    tp.dm[outb + j * out_cg + offs[k]] = ((e - a) * wo) | (addr << 16)
            conv_p = {"IN_ROW": cols_in, "STRIDE": geo.s, "SHIFT": layer.shift}
            params = conv_p | {"OUT_ROW": wo, "OUT_CG": out_cg, "WO": wo, "KH": geo.kh,
                               "KW": geo.kw, "HO": kb, "IN_CG": geo.rows_in(kb) * cols_in}
            if fuse is not None:
                params |= _add_muls(fuse)
            for key, v in params.items():
                if not param_range(Param[key], t).accepts(v):
                    return None
            p = Program().setps(**params)
            p.acquire(LOCK_IN, 2)                  # the weights: a packet per read channel
            for k, (a, e) in enumerate(blocks):
                s = k % STREAM_SLOTS
                for h in range(2):
                    p.acquire(LOCK_WFULL[s][h])
                if fuse is not None and k:
                    p.setps(**conv_p)
                p.setps(IN_BASE=sb[s], IN_CG=geo.rows_in(e - a) * cols_in, HO=e - a, Q_PTR=0,
                        W_PTR=q_words[r],
                        OUT_BASE=outb + offs[k] + 1 if fuse is None else mid,
                        OUT_CG=out_cg if fuse is None else (e - a) * wo)
                for g in rows:
                    p.conv(np.flatnonzero(mask[g]).tolist(), relu=layer.relu)
                for h in range(2):
                    p.release(LOCK_WEMPTY[s][h])
                if fuse is not None:
                    # CONV output + residual, then the block's outputs leave
                    rl = k % 2
                    p.acquire(STREAM_RES_LOCKS[0][rl])
                    p.setps(IN_BASE=mid, IN_ROW=wo, IN_CG=(e - a) * wo, B_BASE=rs[rl],
                            OUT_BASE=outb + offs[k] + 1, OUT_CG=out_cg, Q_PTR=qadd,
                            SHIFT=fuse.add.shift, STRIDE=1)
                    for j in range(nr):
                        p.add(j, relu=fuse.add.relu, fence=j == 0)
                    p.release(STREAM_RES_LOCKS[1][rl])
                p.nop(fence=True)
                p.release(LOCK_OFULL[(k + r) % 2])
            tp.program = p.halt().words
            if len(tp.program) > t.pmem_words:
                return None
            tp.locks = {lk: 1 for pair in LOCK_WEMPTY[:STREAM_SLOTS] for lk in pair}
            if fuse is not None:
                tp.locks |= {lk: 1 for lk in STREAM_RES_LOCKS[1]}
            for h, (g0, g1) in enumerate(halves):
                ins = []
                for k, (a, e) in enumerate(blocks):
                    n_in = geo.rows_in(e - a) * cols_in
                    ins.append(BufferDescriptor(
                        sb[k % STREAM_SLOTS] + g0 * n_in, ((g1 - g0) * n_in,), (1,),
                        acquire=LockAction(LOCK_WEMPTY[k % STREAM_SLOTS][h], 1),
                        release=LockAction(LOCK_WFULL[k % STREAM_SLOTS][h], 1)))
                    if fuse is not None and k % 2 == h:
                        ins.append(BufferDescriptor(
                            rs[h], (nr * (e - a) * wo,), (1,),
                            acquire=LockAction(STREAM_RES_LOCKS[1][h], 1),
                            release=LockAction(STREAM_RES_LOCKS[0][h], 1)))
                tp.bds[CH_W[h]] = _chain(ins)
                tp.bds[CH_OUT[h]] = _chain([
                    BufferDescriptor(outb + offs[k], (1 + (e - a) * wo, nr),
                                     (1, out_cg), acquire=LockAction(LOCK_OFULL[h], 1))
                    for k, (a, e) in enumerate(blocks) if (k + r) % 2 == h])
            if max(len(v) for v in tp.bds.values()) > t.bds_per_channel:
                return None
            tiles.append(tp)

    # ---- read channels: the weights first (tile row r's on column r % C, half on each
    # channel), then the column's row blocks, channel h the input groups of half h (and
    # with a fused add, after the blocks of parity h, each tile's residual of the block) ---
    shim_bds: dict[int, dict[int, list[BufferDescriptor]]] = {c: {0: [], 1: []}
                                                            for c in range(C)}
    for r in act_rows:
        c = act_cols[r % len(act_cols)]
        n_all = wpay[r].size
        cut = _align(n_all // 2, b) if n_all > b else n_all
        for h, (o0, o1) in enumerate(((0, cut), (cut, n_all))):
            n = o1 - o0
            route = (1 + n) | (1 << (rf.row + r)) | col_mask
            write = n | (o0 << 16) | (LOCK_IN << (16 + aw))
            hbase = put(np.array([route, write], dtype=np.uint64))
            bds = [BufferDescriptor(hbase, (2,), (1,))]
            if n:
                bds += _linear_bds(put(wpay[r][o0:o1]), n)
            shim_bds[c][h] += bds
    for c in act_cols:
        y0, y1 = col_out[c]
        for k, a in enumerate(range(y0, y1, kb)):
            e = min(a + kb, y1)
            rows_in = geo.rows_in(e - a)
            a0 = a * geo.s - geo.ph                  # the block's first input row
            iy0, iy1 = max(a0, 0), min(a0 + rows_in, geo.h)
            ptop, pbot = iy0 - a0, a0 + rows_in - iy1
            for h, (g0, g1) in enumerate(halves):
                n = (g1 - g0) * rows_in * cols_in
                hdr = put(np.array([n | (1 << rf.col) | (tile_mask << rf.tile)], np.uint64))
                shim_bds[c][h] += [
                    BufferDescriptor(hdr, (1,), (1,)),
                    BufferDescriptor(in_base + g0 * in_plane + iy0 * in_row,
                                     (x_n, iy1 - iy0, g1 - g0), (geo.sub, in_row, in_plane),
                                     (pad_l, ptop, 0), (pad_r, pbot, 0))]
            if fuse is None:
                continue
            for r in act_rows:
                rows = row_rows[r]
                n = len(rows) * (e - a) * wo
                hdr = put(np.array([n | (1 << rf.col) | (1 << (rf.tile + r))], np.uint64))
                shim_bds[c][k % 2] += [
                    BufferDescriptor(hdr, (1,), (1,)),
                    BufferDescriptor(res_base + rows[0] * geo.ho * wo + a * wo,
                                     ((e - a) * wo, len(rows)), (1, geo.ho * wo))]
    for c in range(C):
        for h in (0, 1):
            if len(shim_bds[c][h]) > cfg.ddr.bds_per_channel:
                return None
            shim_bds[c][h] = _chain(shim_bds[c][h])
    col_rows = [sorted(g for r in act_rows for g in row_rows[r]) if c in act_cols else []
                for c in range(C)]
    return ArrayJob(ji, tiles, shim_bds, col_rows, [(*col_out[c], 0, wo) for c in range(C)],
                    [[] for _ in range(C)], stream=True), best[1]


def _runs_rough(jobs_spec, geo: _Geometry, nnz_row: np.ndarray, cfg: OverlayConfig,
                fused: bool) -> int:
    """A rough cycle count of the runs ``jobs_spec`` (:func:`_try_plan`), comparable with
    :func:`_build_stream_job`'s: per run the largest of the busiest core's issue cycles, the
    read channels' share of its slices, weights (a run with the block rows of the run before
    replays them from the memtile) and residual, and the write channels' share of its
    outputs, plus :data:`RUN_COST_CYCLES`, plus what the cores cannot overlap
    (:func:`_overlap_loss_words`)."""
    t = cfg.tile
    taps = geo.kh * geo.kw
    w_row = [int(n) * taps * t.block + t.qrec_words for n in nnz_row]
    rate = _read_rate(cfg)
    wrate = cfg.array.cols * cfg.ddr.write_channels / cfg.ddr_interval
    total, prev = 0, None
    for row_ranges, col_rows, _, _ in jobs_spec:
        comp = max(sum(int(nnz_row[g]) * taps + 1 for g in rows)
                   * (h1 - h0) * _cdiv(w1 - w0, t.pixels)
                   for rows in col_rows for h0, h1, w0, w1 in row_ranges)
        words = sum(geo.gin * geo.rows_in(h1 - h0) * geo.cols_in(w1 - w0)
                    for h0, h1, w0, w1 in row_ranges if h1 > h0)
        if col_rows != prev:
            words += sum(w_row[g] for rows in col_rows for g in rows)
        prev = col_rows
        outs = sum(len(rows) for rows in col_rows) * sum(
            (h1 - h0) * (w1 - w0) for h0, h1, w0, w1 in row_ranges)
        if fused:
            words += outs
        total += int(max(comp, words / rate, outs / wrate)) + RUN_COST_CYCLES
    return total + int(_overlap_loss_words(jobs_spec, geo, cfg) / rate)


# Pools and element-wise adds --------------------------------------------------------------------

def compile_eltwise_array(layer: PoolLayer | AddLayer, x: np.ndarray, cfg: OverlayConfig, *,
                          x_b: np.ndarray | None = None,
                          name: str | None = None, place: Placement | None = None
                          ) -> ArrayLayer:
    """Compile a max/average pool or a residual add (second operand ``x_b``) for ``cfg``'s
    array.

    Channel groups are split over the columns, the output image over the tile rows (the same
    rectangles as convolutions). Each tile's input (and for an add the second operand) comes
    from its column's DDR channels on the column buses (operand a on bus 0, b on bus 1), one
    packet per tile, without padding: the tile's halo words are set by the configuration (-128
    for a max pool, 0 otherwise), so that padding never crosses DDR and max pools see -128.
    Requantisation records (per-channel multipliers; an add's biases) are configuration too.
    With ``place`` (see :func:`compile_conv_array`) the operands and the output are at the
    placement's addresses and only the inputs' shapes count.
    """
    from tilewright.sw.tile_compiler import _int_vector

    if not isinstance(layer, (PoolLayer, AddLayer)):
        raise TypeError(f"layer must be a PoolLayer or AddLayer, not {type(layer).__name__}")
    t = cfg.tile
    b = t.block
    R, C = cfg.array.rows, cfg.array.cols
    rf = route_fields(cfg)
    lname = name or layer.name
    xa = np.asarray(x)
    if xa.dtype != np.int8 or xa.ndim != 3:
        raise TypeError(f"layer {lname!r}: input must be int8 (C, H, W), not {xa.dtype} "
                        f"{xa.shape}")
    is_add = isinstance(layer, AddLayer)
    if is_add and (x_b is None or np.asarray(x_b).shape != xa.shape):
        raise ValueError(f"layer {lname!r}: an add needs x_b of the input's shape {xa.shape}")
    cin, h, w = xa.shape
    cout, ho, wo = output_shape(layer, xa.shape)
    if is_add:
        (kh, kw), s, (ph, pw) = (1, 1), 1, (0, 0)
    else:
        (kh, kw), s, (ph, pw) = layer.kernel, layer.stride, layer.padding
    geo = _Geometry(cin, h, w, cout, ho, wo, kh, kw, s, ph, pw, _cdiv(cin, b), _cdiv(cin, b))
    G = geo.gin
    pad_value = -128 if isinstance(layer, PoolLayer) and layer.kind == "max" else 0
    if is_add:
        bias = _int_vector(layer.bias, f"layer {lname!r}: bias", cin)
        mult = _int_vector(layer.mult, f"layer {lname!r}: mult", cin)
    else:
        bias = np.zeros(cin, np.int64)
        mult = _int_vector(layer.mult, f"layer {lname!r}: mult", cin)
    qrec = _qbytes_all(ConvLayer(np.zeros((cin, 1, 1, 1), np.int8), bias, mult, 0,
                                 name="q"), b, t.qrec_words)

    # ---- DDR ------------------------------------------------------------------------------
    out_words = G * ho * wo
    img = _DdrImage([xa, np.asarray(x_b)] if is_add else [xa], out_words, b, place, lname)
    n_ops, op_words, bases, out_base = len(img.bases), img.sizes[0], img.bases, img.out_base

    # ---- partition: channel groups, then rows, over runs until every tile fits ------------
    col_groups = [list(range(a, z)) for a, z in _split_rows(G, C)]

    def fits(n_gsplit: int, rects: list[tuple[int, int, int, int]]) -> bool:
        rmax = max(hb - ha for ha, hb, _, _ in rects)
        cmax = max(wb - wa for _, _, wa, wb in rects)
        gmax = -(-max(len(g) for g in col_groups) // n_gsplit)
        need = (_align(gmax * t.qrec_words, b) + n_ops * gmax
                * geo.rows_in(rmax) * geo.cols_in(cmax)
                + gmax * _out_layout(geo, rmax, cmax)[1])
        return need <= t.dmem_words

    plan = None
    for n_gsplit in range(1, max(len(g) for g in col_groups) + 1):
        for n_rsplit in range(1, ho + 1):
            rparts = [rp for rp in _split_rows(ho, n_rsplit) if rp[1] > rp[0]]
            rect_sets = [_rectangles(geo, rp[0], rp[1], R, t.pixels) for rp in rparts]
            if all(fits(n_gsplit, rs) for rs in rect_sets):
                plan = (n_gsplit, rect_sets)
                break
        if plan is not None:
            break
    if plan is None:
        raise ValueError(f"layer {lname!r} does not fit {cfg.name}'s tiles even one output "
                         f"row and one channel group at a time")
    n_gsplit, rect_sets = plan
    jobs: list[ArrayJob] = []
    for gp in range(n_gsplit):
        sub = []
        for g in col_groups:
            a, z = _split_rows(len(g), n_gsplit)[gp]
            sub.append(g[a:z])
        if not any(sub):
            continue
        for rects in rect_sets:
            jobs.append(_eltwise_job(len(jobs), layer, geo, cfg, rf, rects, sub, bases,
                                     out_base, qrec, pad_value, img.put))
    nbytes_io = n_ops * cin * h * w + cout * ho * wo
    macs = (2 if is_add else kh * kw) * cout * ho * wo
    _check_out_words(cfg, lname, out_base, out_words)
    return ArrayLayer(lname, cfg, img.words(), (bases[0], op_words), (out_base, out_words),
                      (cin, h, w), (cout, ho, wo), jobs, macs, 0,
                      nbytes_io, (kh, kw), s, img.base, img.regions())


def _eltwise_job(ji: int, layer, geo: _Geometry, cfg: OverlayConfig, rf,
                 rects: list[tuple[int, int, int, int]], col_groups: list[list[int]],
                 bases: list[int], out_base: int, qrec: list[np.ndarray], pad_value: int,
                 put) -> ArrayJob:
    t = cfg.tile
    b = t.block
    R, C = cfg.array.rows, cfg.array.cols
    is_add = isinstance(layer, AddLayer)
    nops = len(bases)
    pad_word = int.from_bytes(bytes([pad_value & 0xFF]) * b, "little")
    shim_bds: dict[int, dict[int, list[BufferDescriptor]]] = {c: {0: [], 1: []}
                                                            for c in range(C)}
    tiles: list[TilePlan] = []
    for r in range(R):
        for c in range(C):
            h0, h1, w0, w1 = rects[r]
            groups = col_groups[c]
            tp = TilePlan(r, c, rects[r])
            if h1 == h0 or w1 == w0 or not groups:
                tp.program = Program().halt().words
                tiles.append(tp)
                continue
            g0, ng = groups[0], len(groups)
            nrows, ncols = h1 - h0, w1 - w0
            rows_in, cols_in = geo.rows_in(nrows), geo.cols_in(ncols)
            plane = rows_in * cols_in
            a0, b0 = h0 * geo.s - geo.ph, w0 * geo.s - geo.pw
            y0, y1 = max(a0, 0), min(a0 + rows_in, geo.h)
            x0, x1 = max(b0, 0), min(b0 + cols_in, geo.w)
            q_words = _align(ng * t.qrec_words, b)
            inb = [q_words + k * ng * plane for k in range(nops)]
            outb = q_words + nops * ng * plane
            out_row, out_cg, per_row = _out_layout(geo, nrows, ncols)
            assert outb + ng * out_cg <= t.dmem_words
            # configuration: requantisation records, halo words, output packet headers
            qb = np.concatenate([qrec[g] for g in groups])
            for k, wv in enumerate(_words_of(np.concatenate(
                    [qb, np.zeros(q_words * b - qb.size, np.uint8)]), b)):
                tp.dm[k] = int(wv)
            yy, xx = np.meshgrid(np.arange(rows_in), np.arange(cols_in), indexing="ij")
            halo = ~((a0 + yy >= 0) & (a0 + yy < geo.h) & (b0 + xx >= 0) & (b0 + xx < geo.w))
            offs = np.flatnonzero(halo.reshape(-1))
            for k in range(nops):
                for j in range(ng):
                    for o in offs:
                        tp.dm[inb[k] + j * plane + int(o)] = pad_word
            for j, g in enumerate(groups):
                pl = out_base + g * geo.ho * geo.wo
                if per_row:
                    for i in range(nrows):
                        tp.dm[outb + j * out_cg + i * out_row] = \
                            ncols | ((pl + (h0 + i) * geo.wo + w0) << 16)
                else:
                    tp.dm[outb + j * out_cg] = (nrows * ncols) | ((pl + h0 * geo.wo) << 16)
            # operands: one packet per tile on bus k (pools: bus r % 2)
            interior = (x1 - x0, y1 - y0, ng)
            for k in range(nops):
                bus = k if is_add else r % 2
                n = (x1 - x0) * (y1 - y0) * ng
                hbase = put(np.array([n | (1 << rf.col) | (1 << (rf.tile + r))], np.uint64))
                shim_bds[c][bus] += [BufferDescriptor(hbase, (1,), (1,)), BufferDescriptor(
                    bases[k] + g0 * geo.h * geo.w + y0 * geo.w + x0, interior,
                    (1, geo.w, geo.h * geo.w))]
                tp.bds.setdefault(CH_W[bus], []).append(BufferDescriptor(
                    inb[k] + (y0 - a0) * cols_in + (x0 - b0), interior, (1, cols_in, plane),
                    release=LockAction(LOCK_WFULL[0][k], 1)))
            # tile row r's outputs leave on MM2S r mod 2: both write channels of the column
            o = r % 2
            tp.bds[CH_OUT[o]] = [BufferDescriptor(outb, (out_cg, ng), (1, out_cg),
                                                  acquire=LockAction(LOCK_OFULL[o], 1))]
            tp.bds = {ch: _chain(bds) for ch, bds in tp.bds.items()}
            params = {"IN_BASE": inb[0], "IN_ROW": cols_in, "IN_CG": plane,
                      "OUT_BASE": outb + 1, "OUT_ROW": out_row, "OUT_CG": out_cg, "HO": nrows,
                      "WO": ncols, "KH": geo.kh, "KW": geo.kw, "STRIDE": geo.s, "Q_PTR": 0,
                      "SHIFT": layer.shift}
            if is_add:
                params.update(B_BASE=inb[1], MUL_A=layer.mul_a, MUL_B=layer.mul_b)
            for key, v in params.items():
                if not param_range(Param[key], t).accepts(v):
                    raise ValueError(f"layer {layer.name!r}: tile ({r},{c}) parameter {key} "
                                     f"= {v} is outside what the tile accepts "
                                     f"({param_range(Param[key], t).describe()})")
            p = Program().setps(**params)
            for k in range(nops):
                p.acquire(LOCK_WFULL[0][k])
            relu = bool(getattr(layer, "relu", False))
            emit = p.add if is_add else {"max": p.maxpool, "avg": p.avgpool}[layer.kind]
            for j in range(ng):
                emit(j, relu=relu)
            p.nop(fence=True).release(LOCK_OFULL[o])
            tp.program = p.halt().words
            tp.regions = {"q": (0, q_words), "in": (inb[0], nops * ng * plane),
                          "out": (outb, ng * out_cg)}
            tiles.append(tp)
    for c in range(C):
        for ch in (0, 1):
            bds = shim_bds[c][ch]
            if len(bds) > cfg.ddr.bds_per_channel:
                raise ValueError(f"layer {layer.name!r}: column {c} read channel {ch} needs "
                                 f"{len(bds)} BDs, the shim has {cfg.ddr.bds_per_channel}")
            shim_bds[c][ch] = _chain(bds)
    col_rows = [list(g) for g in col_groups]
    return ArrayJob(ji, tiles, shim_bds, col_rows, rects, [[] for _ in range(C)])
