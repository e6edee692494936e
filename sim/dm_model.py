"""Python model of the datamover channel (:class:`tilewright.hw.datamover.Datamover`).

* :func:`bd_elements` / :func:`bd_addresses`: the elements of one BD in stream order;
* :func:`task_bds`: the BD indices a task runs (its chain);
* :func:`run_mm2s`, :func:`run_s2mm`: the words a task streams out / the memory after a task
  streamed words in;
* :func:`transfer_cycles`: the cycles a channel takes for a list of tasks at one word per
  cycle, plus lock waits (exact for the RTL when nothing back-pressures, see the docstring).

BDs are :class:`tilewright.hw.bd.BufferDescriptor` objects, given as a sequence indexed by BD
number (None for unused entries) or a mapping from BD number to BD.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tilewright.hw.bd import DIMS, PAD_DIMS, BufferDescriptor

__all__ = [
    "BDS_PER_TASK_LIMIT", "BdTable", "bd_addresses", "bd_elements", "run_mm2s", "run_s2mm",
    "task_bds", "task_words", "transfer_cycles",
]

BdTable = Sequence[BufferDescriptor | None] | Mapping[int, BufferDescriptor]
#: A chain longer than this is taken for a loop (:func:`task_bds` raises).
BDS_PER_TASK_LIMIT = 100_000

#: Cycles of the RTL (see ``docs/datamover.md``, "Cycle model").
TASK_START_CYCLES = 1     # IDLE: pop the task queue and read the first BD
BD_LOAD_CYCLES = 1        # LOAD: latch the BD and its bounds
QUEUE_CYCLES = 1          # a task written into the queue is visible the next cycle
MM2S_DRAIN_CYCLES = 2     # the last word: read stage, then the skid FIFO's output


def bd_addresses(bd: BufferDescriptor) -> tuple[np.ndarray, np.ndarray]:
    """Word addresses and in-range mask of every element of ``bd``, in stream order.

    Returns
    -------
    (addresses, in_range) : (numpy.ndarray of int64, numpy.ndarray of bool)
        ``addresses[k]`` is ``base + sum_d (i_d - pad_before_d) * stride_d`` modulo 2**32
        (meaningful where ``in_range[k]``). Read-only: results are cached (the overlay
        model asks for the same BDs in every iteration).
    """
    if not isinstance(bd, BufferDescriptor):
        raise TypeError(f"bd must be a BufferDescriptor, not {bd!r}")
    return _bd_addresses(bd)


@functools.lru_cache(maxsize=1 << 14)
def _bd_addresses(bd: BufferDescriptor) -> tuple[np.ndarray, np.ndarray]:
    pb = (*bd.pad_before, *([0] * (DIMS - PAD_DIMS)))
    ext = bd.extents
    # outermost dimension first so that ravel() gives d0 fastest
    offs = np.zeros((1,) * DIMS, np.int64)
    ok = np.ones((1,) * DIMS, bool)
    for d in range(DIMS):
        i = np.arange(ext[d], dtype=np.int64) - pb[d]
        shape = [1] * DIMS
        shape[DIMS - 1 - d] = ext[d]
        offs = offs + (i * bd.strides[d]).reshape(shape)
        ok = ok & ((i >= 0) & (i < bd.sizes[d])).reshape(shape)
    addrs = (bd.base + offs.ravel()) % (1 << 32)
    mask = np.broadcast_to(ok, offs.shape).ravel().copy()
    addrs.flags.writeable = False
    mask.flags.writeable = False
    return addrs, mask


def bd_elements(bd: BufferDescriptor) -> list[int | None]:
    """The elements of ``bd`` in stream order: a word address, or None for a zero (padding)."""
    addrs, ok = bd_addresses(bd)
    return [int(a) if v else None for a, v in zip(addrs.tolist(), ok.tolist(), strict=True)]


def _bd(bds: BdTable, index: int, where: str) -> BufferDescriptor:
    try:
        bd = bds[index]
    except (IndexError, KeyError):
        bd = None
    if bd is None:
        raise ValueError(f"{where} names BD {index}, which is not defined")
    if not isinstance(bd, BufferDescriptor):
        raise TypeError(f"BD {index} must be a BufferDescriptor, not {bd!r}")
    return bd


def task_bds(bds: BdTable, start: int) -> list[int]:
    """The BD indices a task starting at BD ``start`` runs, in order.

    Raises
    ------
    ValueError
        If a BD of the chain is undefined or the chain is longer than
        :data:`BDS_PER_TASK_LIMIT` (a loop).
    """
    out = [start]
    bd = _bd(bds, start, "the task")
    while bd.next_bd is not None:
        if len(out) >= BDS_PER_TASK_LIMIT:
            raise ValueError(f"the chain from BD {start} is longer than {BDS_PER_TASK_LIMIT} "
                             f"BDs (a loop?)")
        nxt = bd.next_bd
        bd = _bd(bds, nxt, f"BD {out[-1]}'s next_bd")
        out.append(nxt)
    return out


def task_words(bds: BdTable, start: int) -> int:
    """Stream words of the task starting at BD ``start`` (padding included)."""
    return sum(_bd(bds, i, "the task").n_elements for i in task_bds(bds, start))


def _checked_addresses(bd: BufferDescriptor, index: int, size: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    addrs, ok = bd_addresses(bd)
    bad = np.nonzero(ok & (addrs >= size))[0]
    if bad.size:
        k = int(bad[0])
        raise ValueError(f"BD {index}, element {k}: address {int(addrs[k])} is outside the "
                         f"memory of {size} words")
    return addrs, ok


def run_mm2s(mem: Sequence[int] | np.ndarray, bds: BdTable, start: int) -> list[int]:
    """The words an MM2S channel streams out for the task starting at BD ``start``.

    Parameters
    ----------
    mem : sequence of int or numpy.ndarray
        The memory, one word per entry.
    bds : sequence or mapping of BufferDescriptor
        The channel's BDs.
    start : int
        The task's first BD.

    Returns
    -------
    list of int
        One word per element: the memory word at its address, or 0 for padding.

    Raises
    ------
    ValueError
        If a chained BD is undefined or an in-range address is outside ``mem``.
    """
    arr = np.asarray(mem)
    out: list[int] = []
    for i in task_bds(bds, start):
        addrs, ok = _checked_addresses(_bd(bds, i, "the task"), i, len(arr))
        words = arr[np.where(ok, addrs, 0)]
        out += [int(w) if v else 0 for w, v in zip(words.tolist(), ok.tolist(), strict=True)]
    return out


def run_s2mm(mem: Sequence[int] | np.ndarray, bds: BdTable, start: int,
             words: Sequence[int] | np.ndarray) -> Any:
    """The memory after an S2MM channel wrote the task starting at BD ``start``.

    Parameters
    ----------
    mem : sequence of int or numpy.ndarray
        The memory before the task (not modified).
    bds : sequence or mapping of BufferDescriptor
        The channel's BDs (no padding: S2MM channels have none).
    start : int
        The task's first BD.
    words : sequence of int or numpy.ndarray
        The stream words, exactly :func:`task_words` of them.

    Returns
    -------
    numpy.ndarray or list
        A new memory of the type of ``mem``: element ``k`` of the task went to its address,
        in order (a later write to the same address wins).

    Raises
    ------
    ValueError
        If a BD has padding, the number of words is not the task's, or an address is outside
        ``mem``.
    """
    out = np.array(mem, copy=True)
    w = np.asarray(words)
    need = task_words(bds, start)
    if len(w) != need:
        raise ValueError(f"the task from BD {start} takes {need} words, not {len(w)}")
    pos = 0
    for i in task_bds(bds, start):
        bd = _bd(bds, i, "the task")
        if bd.has_padding:
            raise ValueError(f"BD {i} has padding; S2MM channels accept none")
        addrs, _ = _checked_addresses(bd, i, len(out))
        n = len(addrs)
        # a later write to the same address wins: keep each address's last occurrence
        rev = addrs[::-1]
        _, first = np.unique(rev, return_index=True)
        keep = n - 1 - first
        out[addrs[keep]] = w[pos:pos + n][keep]
        pos += n
    return out if isinstance(mem, np.ndarray) else out.tolist()


def transfer_cycles(bds: BdTable, tasks: Sequence[int], *, direction: str,
                    lock_wait: int = 0) -> int:
    """Cycles a channel takes for ``tasks`` at one word per cycle.

    The count runs from the cycle the first task is written into the (empty) task queue of an
    idle channel to the last cycle ``busy`` is high, with every task queued in time, no
    back-pressure on the stream or the memory, and each acquire granted after ``lock_wait``
    cycles of waiting (0: at once). With ``lock_wait=0`` and free locks this is exactly what
    the RTL takes (``tests/test_datamover.py`` checks it):

        1 (queue) + per task: 1 (IDLE) + per BD: 1 (LOAD) + [1 + lock_wait (ACQ)]
        + n_elements (RUN) + [1 (REL)]

    and for MM2S 2 more cycles for the last word to leave the read stage and the skid FIFO,
    of which the last BD's REL cycle (if any) is one.

    Parameters
    ----------
    bds : sequence or mapping of BufferDescriptor
        The channel's BDs.
    tasks : sequence of int
        First BD of each task.
    direction : {"mm2s", "s2mm"}
        The channel's direction.
    lock_wait : int
        Extra cycles each acquire waits.

    Raises
    ------
    ValueError
        If ``direction`` or ``lock_wait`` is invalid, or a chain is.
    """
    if direction not in ("mm2s", "s2mm"):
        raise ValueError(f"direction must be 'mm2s' or 's2mm', not {direction!r}")
    if isinstance(lock_wait, bool) or not isinstance(lock_wait, int) or lock_wait < 0:
        raise ValueError(f"lock_wait must be a non-negative integer, not {lock_wait!r}")
    if not tasks:
        return 0
    cycles = QUEUE_CYCLES
    last_release = 0
    for start in tasks:
        cycles += TASK_START_CYCLES
        for i in task_bds(bds, start):
            bd = _bd(bds, i, "the task")
            cycles += BD_LOAD_CYCLES + bd.n_elements
            if bd.acquire is not None:
                cycles += 1 + lock_wait
            last_release = int(bd.release is not None)
            cycles += last_release
    if direction == "mm2s":
        # the last word leaves 2 cycles after the last read; a final release overlaps that
        cycles += MM2S_DRAIN_CYCLES - last_release
    return cycles
