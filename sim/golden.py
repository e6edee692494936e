"""Golden model of the compute tile: executes a program bit for bit and counts cycles exactly
as the RTL does (see the cycle model in ``docs/architecture.md``).

Importable with no simulator: it needs numpy and the ISA definition only. Each op is executed
with vectorised numpy over all output pixels; cycles come from closed formulas per chunk, so
the model's speed does not depend on the number of simulated cycles.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from tilewright.hw.config import TileConfig
from tilewright.hw.isa import (
    LOOP_DEPTH,
    N_LOCKS,
    ErrorCode,
    Flag,
    Instr,
    Opcode,
    Param,
    check_static,
    decode_index_word,
    index_words,
    param_range,
)
from tilewright.sw.numerics import requantize

__all__ = ["DeadlockError", "HazardError", "LockHook", "RunResult", "TileModel", "op_steps",
           "reset_params"]


class HazardError(RuntimeError):
    """A program reads memory that an earlier op's writeback may not have written yet
    (it needs the FENCE flag), or an op's output overlaps its own input."""


class LockHook(Protocol):
    """The environment of a tile in :meth:`TileModel.run` (see there)."""

    def acquire(self, lock: int, value: int, cycle: int, locks: list[int],
                mem: np.ndarray) -> int: ...

    def release(self, lock: int, value: int, cycle: int, locks: list[int],
                mem: np.ndarray) -> None: ...


class DeadlockError(RuntimeError):
    """An ACQ can never be granted (in a single-tile run nothing else releases locks)."""


@functools.lru_cache(maxsize=1 << 16)
def decoded(word: int) -> tuple[Instr, ErrorCode, Opcode | None, Param | None]:
    """``word`` decoded, its static error, its opcode and (SETP) its parameter, cached: the
    models decode the same few hundred words millions of times."""
    ins = Instr.decode(word)
    err = check_static(ins)
    op = ins.op
    prm = Param(ins.a) if op is Opcode.SETP and err is ErrorCode.NONE else None
    return ins, err, op, prm


def reset_params() -> dict[Param, int]:
    """Parameter register values after ``start``."""
    p = {q: 0 for q in Param}
    for q in (Param.HO, Param.WO, Param.KH, Param.KW, Param.STRIDE):
        p[q] = 1
    return p


def op_steps(op: Opcode, nnz: int, kh: int, kw: int) -> int:
    """Steps per chunk: CONV one per non-zero block and tap, pools one per tap, ADD two."""
    if op is Opcode.CONV:
        return nnz * kh * kw
    if op is Opcode.ADD:
        return 2
    return kh * kw


@dataclass
class OpTrace:
    """Timing of one executed op (for reports and tests)."""

    pc: int
    op: Opcode
    issue_start: int
    issue_end: int
    macs: int


@dataclass
class RunResult:
    dmem: np.ndarray
    cycles: int
    error: ErrorCode = ErrorCode.NONE
    error_pc: int = 0
    instructions: int = 0
    mac_cycles: int = 0
    ops: list[OpTrace] = field(default_factory=list)
    locks: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is ErrorCode.NONE


def _issue_chunks(total: int, steps: int, depth: int, ready: int, d0: int, d1: int,
                  hold: bool) -> tuple[int | None, int, int, int]:
    """Issue an op of ``total`` pixel groups and ``steps`` steps from cycle ``ready`` in chunks
    of at most ``depth`` groups (the cycle model of ``docs/architecture.md``), given ``d0``,
    ``d1``: the writeback ends of the chunk before last and of the last chunk. Returns the
    first chunk's issue cycle (None without chunks), the last issue cycle and the new
    ``d0``, ``d1``."""
    first_issue = None
    e = ready - 1
    done = 0
    while done < total:
        # a fully sparse block row is one chunk of every group (no accumulator use)
        ng = min(depth, total - done) if steps else total - done
        tk = max(ready, d0 + 1)
        if first_issue is None:
            first_issue = tk
        e = tk + (steps * ng if steps else 1) - 1
        ready = e + 1
        if not hold:        # a HOLD chunk has no writeback and keeps its buffer
            d0, d1 = d1, max(e + 2, d1 + 1) + ng - 1
        done += ng
    return first_issue, e, d0, d1


def _loop_pc(loops: list[list[int]], pc: int, is_loop: bool, count: int) -> int:
    """The pc after a LOOP (``is_loop``, ``count`` iterations) or ENDLOOP at ``pc``;
    ``loops`` is the [start pc, remaining count] stack."""
    if is_loop:
        loops.append([pc + 1, count])
        return pc + 1
    if loops[-1][1] == 1:
        loops.pop()
        return pc + 1
    loops[-1][1] -= 1
    return loops[-1][0]


class TileModel:
    """Executes tile programs on a data memory image.

    Parameters
    ----------
    tile : TileConfig
        The tile the program targets.
    check_hazards : bool
        Raise :class:`HazardError` when the program relies on writebacks the RTL may not have
        finished (missing FENCE), since the RTL would then disagree with this model.
    timing_only : bool
        Count cycles without computing any op (no data written, no hazard checks, ``macs`` of
        every op trace 0): the cycle counts are the same, since they depend on the program
        and the lock grants only. The network compiler's estimator runs the overlay model so.
    """

    def __init__(self, tile: TileConfig, *, check_hazards: bool = True,
                 timing_only: bool = False) -> None:
        if not isinstance(tile, TileConfig):
            raise TypeError(f"tile must be a TileConfig, not {tile!r}")
        self.tile = tile
        self.check_hazards = check_hazards
        self.timing_only = timing_only
        self._ranges = {p: param_range(p, tile) for p in Param}
        #: timing-only runs take :meth:`_run_timing` (the same cycles as :meth:`run`'s own
        #: loop, which tests compare by turning this off)
        self.fast_timing = True
        self._decoded_programs: dict[int, tuple[list[int], list[tuple]]] = {}

    # ------------------------------------------------------------------------------------
    def run(self, program: list[int], dmem: np.ndarray, *,
            locks: list[int] | None = None,
            max_instructions: int = 10_000_000,
            lock_hook: LockHook | None = None) -> RunResult:
        """Run ``program`` on a copy of ``dmem``.

        ``locks`` are the initial lock values (default all 0); ACQ is granted at once when the
        lock holds enough, REL adds; each costs FETCH + DECODE, like the RTL with the single-
        tile harness's combinational lock unit. The final values are in ``RunResult.locks``.

        ``lock_hook`` lets the tile's environment (its datamovers, in
        :mod:`tilewright.sim.overlay_model`) take part: an ACQ that the lock cannot grant
        calls ``lock_hook.acquire(lock, value, cycle, locks, mem)``, which may write the
        memory and release locks and returns the cycle from which the ACQ is granted (the
        program waits until then); every REL then calls ``lock_hook.release(lock, value,
        cycle, locks, mem)`` after adding. ``mem`` is the tile memory (uint8, written in
        place) and ``locks`` the list of lock values.
        """
        t = self.tile
        lock = [0] * N_LOCKS if locks is None else [int(v) for v in locks]
        if len(lock) != N_LOCKS:
            raise ValueError(f"locks must hold {N_LOCKS} values, not {len(lock)}")
        if len(program) > t.pmem_words:
            raise ValueError(f"program has {len(program)} words; program memory holds "
                             f"{t.pmem_words}")
        mem = np.array(dmem, dtype=np.uint8, copy=True)
        if mem.shape != (t.dmem_bytes,):
            raise ValueError(f"dmem image must be {t.dmem_bytes} bytes, not {mem.shape}")
        if self.timing_only and self.fast_timing:
            return self._run_timing(program, mem, lock, max_instructions, lock_hook)
        loops: list[list[int]] = []          # [start pc, remaining count]
        pm = [0] * t.pmem_words
        pm[:len(program)] = [int(w) for w in program]
        words = mem.view(np.int8).reshape(t.dmem_words, t.block)

        params = reset_params()
        pc = 0
        now = 0                      # cycle of the current FETCH
        d_hist: deque[int] = deque([-10, -10], maxlen=2)   # d of the last two chunks
        pending: list[tuple[int, np.ndarray]] = []         # (d, written word addresses)
        held: tuple[tuple[int, int], np.ndarray | None] | None = None   # a HOLD op's sums
        res = RunResult(mem, 0)
        ninstr = 0
        while True:
            ninstr += 1
            if ninstr > max_instructions:
                raise RuntimeError(f"program did not halt within {max_instructions} "
                                   f"instructions")
            ins, err, op, prm = decoded(pm[pc])
            decode = now + 1
            nidx = index_words(ins.b) if op is Opcode.CONV else 0
            if err is ErrorCode.NONE and op is not Opcode.HALT and pc + 1 + nidx >= t.pmem_words:
                err = ErrorCode.PC_OVERFLOW
            if err is ErrorCode.NONE and ((op is Opcode.LOOP and len(loops) == LOOP_DEPTH)
                                          or (op is Opcode.ENDLOOP and not loops)):
                err = ErrorCode.LOOP_NESTING
            if (err is ErrorCode.NONE and op is Opcode.SETP
                    and not self._ranges[prm].accepts(ins.imm)):
                err = ErrorCode.BAD_VALUE
            if err is not ErrorCode.NONE:
                res.error, res.error_pc, res.cycles = err, pc, decode + 1
                break
            if op is Opcode.HALT:
                c = max(decode, d_hist[-1] + 1)
                res.cycles = c + 1
                break
            if op in (Opcode.SETP, Opcode.NOP):
                if op is Opcode.SETP:
                    params[prm] = ins.imm
                elif ins.a & Flag.FENCE.value:
                    decode = max(decode, d_hist[-1] + 1)
                    pending = []
                pc += 1
                now = decode + 1
                continue
            if op in (Opcode.ACQ, Opcode.REL):
                if op is Opcode.ACQ:
                    if lock[ins.a] < ins.imm and lock_hook is not None:
                        decode = max(decode, int(lock_hook.acquire(ins.a, ins.imm, decode,
                                                                   lock, mem)))
                    if lock[ins.a] < ins.imm:
                        raise DeadlockError(f"ACQ of lock {ins.a} for {ins.imm} at pc {pc} "
                                            f"waits forever: the lock holds {lock[ins.a]} and "
                                            f"nothing else releases it in a single-tile run")
                    lock[ins.a] -= ins.imm
                else:
                    lock[ins.a] = min(lock[ins.a] + ins.imm, 63)
                    if lock_hook is not None:
                        lock_hook.release(ins.a, ins.imm, decode, lock, mem)
                pc += 1
                now = decode + 1
                continue
            if op is Opcode.LOOP or op is Opcode.ENDLOOP:
                pc = _loop_pc(loops, pc, op is Opcode.LOOP, ins.b)
                now = decode + 1
                continue
            # engine op ------------------------------------------------------------------
            fence = bool(ins.a & Flag.FENCE.value)
            c = max(decode, d_hist[-1] + 1) if fence else decode
            if fence:
                pending = []
            idx: list[int] = []
            if op is Opcode.CONV and self.timing_only:
                idx = [0] * ins.b                 # only their number times the op
            elif op is Opcode.CONV:
                for k in range(nidx):
                    idx += decode_index_word(pm[pc + 1 + k])
                idx = idx[:ins.b]
            ready = c + 2
            pending = [(d, a) for (d, a) in pending if d >= ready]
            ho, wo = params[Param.HO], params[Param.WO]
            wg = -(-wo // t.pixels)
            total = ho * wg
            steps = op_steps(op, len(idx), params[Param.KH], params[Param.KW])
            hold = bool(ins.a & Flag.HOLD.value)
            accf = bool(ins.a & Flag.ACC.value)
            if (hold or accf) and (op is not Opcode.CONV or not steps or total > t.acc_depth):
                raise HazardError(f"pc {pc}: HOLD/ACC need a CONV with non-zero blocks whose "
                                  f"{total} pixel groups fit one accumulator chunk "
                                  f"({t.acc_depth})")
            if accf and (held is None or held[0] != (ho, wo)):
                raise HazardError(f"pc {pc}: ACC without a HOLD op of the same {ho}x{wo} "
                                  f"window just before")
            carry = held[1] if accf and held is not None else None
            if self.timing_only:
                writes, macs, acc_out = np.zeros(0, np.int64), 0, None
            else:
                reads, writes, macs, acc_out = self._execute(op, ins, idx, params, words,
                                                             carry, hold)
                if self.check_hazards:
                    self._check(pc, reads, writes, pending)
            held = ((ho, wo), acc_out) if hold else None
            first_issue, e, d_prev, d_last = _issue_chunks(total, steps, t.acc_depth, ready,
                                                           d_hist[0], d_hist[-1], hold)
            d_hist.extend((d_prev, d_last))
            res.mac_cycles += steps * total
            if not hold:
                pending.append((d_hist[-1], writes))
            res.ops.append(OpTrace(pc, op, first_issue or ready, e, macs))
            # auto-advance
            wd = t.dmem_words
            if op is Opcode.CONV:
                params[Param.W_PTR] = (params[Param.W_PTR] + len(idx) * params[Param.KH]
                                       * params[Param.KW] * t.block) % wd
            params[Param.Q_PTR] = (params[Param.Q_PTR] + t.qrec_words) % wd
            if not hold:
                params[Param.OUT_BASE] = (params[Param.OUT_BASE] + params[Param.OUT_CG]) % wd
            pc += 1 + nidx
            now = e + 1
        res.instructions = ninstr
        res.locks = lock
        return res

    # ------------------------------------------------------------------------------------
    def _predecode(self, program: list[int]) -> list[tuple]:
        """``program`` and one zero word after it (what program memory holds past it), one
        plain tuple per word: ``(kind, a, b, imm, static error, bad SETP value, index words,
        parameter, fence, hold, acc, op)``; kinds 0 error, 1 HALT, 2 SETP, 3 NOP, 4 ACQ,
        5 REL, 6 LOOP, 7 ENDLOOP, 8 engine op. Cached per program: the estimator runs each
        tile program several times."""
        got = self._decoded_programs.get(id(program))
        if got is not None and got[0] == program:      # the same words (a C-level compare)
            return got[1]
        key = [int(w) for w in program]
        kinds = {Opcode.HALT: 1, Opcode.SETP: 2, Opcode.NOP: 3, Opcode.ACQ: 4, Opcode.REL: 5,
                 Opcode.LOOP: 6, Opcode.ENDLOOP: 7, Opcode.CONV: 8, Opcode.MAXPOOL: 8,
                 Opcode.AVGPOOL: 8, Opcode.ADD: 8}
        order = list(Param)
        out = []
        for w in (*key, 0):             # past the program, program memory reads zero
            ins, err, op, prm = decoded(w)
            kind = 0 if err is not ErrorCode.NONE else kinds[op]
            # a SETP value out of range: BAD_VALUE, checked after the pc and loop checks
            bad = kind == 2 and not self._ranges[prm].accepts(ins.imm)
            a = ins.a
            out.append((kind, a, ins.b, ins.imm, err, bad,
                        index_words(ins.b) if op is Opcode.CONV else 0,
                        order.index(prm) if prm is not None else -1,
                        bool(a & Flag.FENCE.value), bool(a & Flag.HOLD.value),
                        bool(a & Flag.ACC.value), op))
        if len(self._decoded_programs) > 256:
            self._decoded_programs.clear()
        self._decoded_programs[id(program)] = (key, out)
        return out

    def _run_timing(self, program: list[int], mem: np.ndarray, lock: list[int],
                    max_instructions: int, lock_hook: LockHook | None) -> RunResult:
        """:meth:`run` with ``timing_only``: the same cycles, lock calls, op traces and
        errors, from a program decoded once into plain tuples and parameters in a list
        (no enum in the loop): the network estimator's tile runs take half the time."""
        t = self.tile
        pm = self._predecode(program)
        npm = len(pm) - 1
        order = list(Param)
        params = [v for _, v in sorted(reset_params().items(), key=lambda kv: order.index(kv[0]))]
        i_ho, i_wo, i_kh, i_kw = (order.index(q) for q in (Param.HO, Param.WO, Param.KH,
                                                           Param.KW))
        i_w, i_q, i_ob, i_ocg = (order.index(q) for q in (Param.W_PTR, Param.Q_PTR,
                                                          Param.OUT_BASE, Param.OUT_CG))
        pixels, depth, blk, wd, pmw = t.pixels, t.acc_depth, t.block, t.dmem_words, t.pmem_words
        qrec = t.qrec_words
        loops: list[list[int]] = []
        pc = 0
        now = 0
        d0, d1 = -10, -10                 # d of the chunk before last, of the last chunk
        held: tuple[int, int] | None = None
        res = RunResult(mem, 0)
        ops = res.ops
        mac_cycles = 0
        ninstr = 0
        while True:
            ninstr += 1
            if ninstr > max_instructions:
                raise RuntimeError(f"program did not halt within {max_instructions} "
                                   f"instructions")
            kind, a, b, imm, err, bad, nidx, prm, fence, hold, accf, op = \
                pm[pc] if pc < npm else pm[-1]
            decode = now + 1
            if kind == 0:
                res.error, res.error_pc, res.cycles = err, pc, decode + 1
                break
            if kind != 1 and pc + 1 + nidx >= pmw:
                res.error, res.error_pc, res.cycles = ErrorCode.PC_OVERFLOW, pc, decode + 1
                break
            if (kind == 6 and len(loops) == LOOP_DEPTH) or (kind == 7 and not loops):
                res.error, res.error_pc, res.cycles = ErrorCode.LOOP_NESTING, pc, decode + 1
                break
            if bad:
                res.error, res.error_pc, res.cycles = ErrorCode.BAD_VALUE, pc, decode + 1
                break
            if kind == 1:
                res.cycles = max(decode, d1 + 1) + 1
                break
            if kind == 2:
                params[prm] = imm
                pc += 1
                now = decode + 1
                continue
            if kind == 3:
                if fence:
                    decode = max(decode, d1 + 1)
                pc += 1
                now = decode + 1
                continue
            if kind == 4:
                if lock[a] < imm and lock_hook is not None:
                    decode = max(decode, int(lock_hook.acquire(a, imm, decode, lock, mem)))
                if lock[a] < imm:
                    raise DeadlockError(f"ACQ of lock {a} for {imm} at pc {pc} waits forever: "
                                        f"the lock holds {lock[a]} and nothing else releases "
                                        f"it in a single-tile run")
                lock[a] -= imm
                pc += 1
                now = decode + 1
                continue
            if kind == 5:
                lock[a] = min(lock[a] + imm, 63)
                if lock_hook is not None:
                    lock_hook.release(a, imm, decode, lock, mem)
                pc += 1
                now = decode + 1
                continue
            if kind == 6 or kind == 7:
                pc = _loop_pc(loops, pc, kind == 6, b)
                now = decode + 1
                continue
            # engine op
            c = max(decode, d1 + 1) if fence else decode
            ho, wo = params[i_ho], params[i_wo]
            total = ho * -(-wo // pixels)
            steps = op_steps(op, b, params[i_kh], params[i_kw])
            if (hold or accf) and (op is not Opcode.CONV or not steps or total > depth):
                raise HazardError(f"pc {pc}: HOLD/ACC need a CONV with non-zero blocks whose "
                                  f"{total} pixel groups fit one accumulator chunk ({depth})")
            if accf and held != (ho, wo):
                raise HazardError(f"pc {pc}: ACC without a HOLD op of the same {ho}x{wo} "
                                  f"window just before")
            held = (ho, wo) if hold else None
            ready = c + 2
            first_issue, e, d0, d1 = _issue_chunks(total, steps, depth, ready, d0, d1, hold)
            mac_cycles += steps * total
            ops.append(OpTrace(pc, op, first_issue or ready, e, 0))
            if op is Opcode.CONV:
                params[i_w] = (params[i_w] + b * params[i_kh] * params[i_kw] * blk) % wd
            params[i_q] = (params[i_q] + qrec) % wd
            if not hold:
                params[i_ob] = (params[i_ob] + params[i_ocg]) % wd
            pc += 1 + nidx
            now = e + 1
        res.mac_cycles = mac_cycles
        res.instructions = ninstr
        res.locks = lock
        return res

    # ------------------------------------------------------------------------------------
    def _execute(self, op: Opcode, ins: Instr, idx: list[int], p: dict[Param, int],
                 words: np.ndarray, carry: np.ndarray | None = None, hold: bool = False
                 ) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
        """Execute one op on ``words`` in place; return (read addrs, written addrs, MACs, the
        accumulators when ``hold``). A CONV starts from ``carry`` (ACC) instead of zero; with
        ``hold`` nothing is written back."""
        t = self.tile
        b, nw = t.block, t.dmem_words
        ho, wo, s = p[Param.HO], p[Param.WO], p[Param.STRIDE]
        kh_n, kw_n = p[Param.KH], p[Param.KW]
        row = p[Param.IN_ROW]
        oy = np.arange(ho, dtype=np.int64)[:, None]
        ox = np.arange(wo, dtype=np.int64)[None, :]
        pix = oy * s * row + ox * s                      # (HO, WO)
        reads: list[np.ndarray] = []
        w64 = words.astype(np.int64)

        def gather(base: int) -> np.ndarray:
            a = (base + pix) % nw
            reads.append(a.ravel())
            return w64[a]                                 # (HO, WO, b)

        macs = 0
        if op is Opcode.CONV:
            acc = (np.zeros((ho, wo, b), dtype=np.int64) if carry is None
                   else carry.copy())
            wptr = p[Param.W_PTR]
            taps = kh_n * kw_n
            for j, cg in enumerate(idx):
                base = p[Param.IN_BASE] + cg * p[Param.IN_CG]
                for tap in range(taps):
                    kh, kw = divmod(tap, kw_n)
                    a = gather(base + kh * row + kw)
                    la = (wptr + (j * taps + tap) * b + np.arange(b)) % nw
                    reads.append(la)
                    acc += a @ w64[la].T
            macs = len(idx) * taps * ho * wo * b * b
        elif op in (Opcode.MAXPOOL, Opcode.AVGPOOL):
            base = p[Param.IN_BASE] + ins.b * p[Param.IN_CG]
            taps = [gather(base + kh * row + kw)
                    for kh in range(kh_n) for kw in range(kw_n)]
            acc = np.max(taps, axis=0) if op is Opcode.MAXPOOL else np.sum(taps, axis=0)
        else:  # ADD
            off = ins.b * p[Param.IN_CG]
            acc = (p[Param.MUL_A] * gather(p[Param.IN_BASE] + off)
                   + p[Param.MUL_B] * gather(p[Param.B_BASE] + off))
        qa = (p[Param.Q_PTR] + np.arange(t.qrec_words)) % nw
        reads.append(qa)
        if hold:
            return np.concatenate(reads), np.zeros(0, np.int64), macs, acc
        qbytes = words[qa].view(np.uint8).reshape(-1)
        bias = qbytes[:4 * b].view("<i4").astype(np.int64)
        mult = qbytes[4 * b:8 * b].view("<i4").astype(np.int64)
        y = requantize(acc, bias, mult, p[Param.SHIFT], bool(ins.a & Flag.RELU.value))
        out = (p[Param.OUT_BASE] + oy * p[Param.OUT_ROW] + ox) % nw
        words[out] = y
        return np.concatenate(reads), out.ravel(), macs, None

    @staticmethod
    def _check(pc: int, reads: np.ndarray, writes: np.ndarray,
               pending: list[tuple[int, np.ndarray]]) -> None:
        if np.intersect1d(reads, writes).size:
            raise HazardError(f"op at pc {pc} writes words it also reads (in-place op); "
                              f"first overlapping word {np.intersect1d(reads, writes)[0]}")
        for _, w in pending:
            hit = np.intersect1d(reads, w)
            if hit.size:
                raise HazardError(f"op at pc {pc} reads word {hit[0]} written by an earlier "
                                  f"op whose writeback may still be running; set FENCE")


