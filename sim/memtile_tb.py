"""cocotb test module driving ``tw_memtile_harness`` (``sim/harness/memtile_harness.sv``).

Run by :func:`tilewright.sim.memtile_sim.run_memtile_jobs` (``+TW_JOBS=<jobs.json>``). Per
job: reset, write the BDs and lock values, queue the tasks, then drive both S2MM streams and
both MM2S readies with seeded random handshakes, cycle by cycle (the jobs are short), until
every expected MM2S word has come out and every channel is idle, or ``max_cycles`` passed;
``results.json`` gets each MM2S stream, the cycles and the error and busy flags.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import cocotb
from cocotb.triggers import FallingEdge, ReadOnly

from tilewright.sim.harness_protocol import jobs_spec


async def _cycle(dut: Any) -> None:
    await FallingEdge(dut.clk)


async def _run(dut: Any, job: dict[str, Any], bd_index_bits: int) -> dict[str, Any]:
    wb = int(job["word_bits"])
    mask = (1 << wb) - 1
    rng = random.Random(int(job["seed"]))
    for port in ("bd_we", "task_valid", "lock_wr_en", "s_valid", "m_ready"):
        getattr(dut, port).value = 0
    dut.rst.value = 1
    for _ in range(3):
        await _cycle(dut)
    dut.rst.value = 0
    await _cycle(dut)
    for ch, idx, value in job["bds"]:
        dut.bd_we.value, dut.bd_ch.value, dut.bd_addr.value = 1, ch, idx
        dut.bd_wdata.value = int(value)
        await _cycle(dut)
    dut.bd_we.value = 0
    for lock, value in job["locks"]:
        dut.lock_wr_en.value, dut.lock_wr_id.value, dut.lock_wr_value.value = 1, lock, value
        await _cycle(dut)
    dut.lock_wr_en.value = 0
    for ch in job["tasks"]:
        dut.task_valid.value = 1
        dut.task_payload.value = ch << bd_index_bits
        while True:
            await ReadOnly()
            ready = int(dut.task_ready.value)
            await _cycle(dut)
            if ready:
                break
    dut.task_valid.value = 0
    pending = [list(job["streams"][0]), list(job["streams"][1])]
    want = [int(n) for n in job["out_words"]]
    got: list[list[int]] = [[], []]
    cycles = 0
    while cycles < int(job["max_cycles"]):
        sv = [int(bool(pending[k]) and rng.random() < job["p_valid"]) for k in (0, 1)]
        dut.s_valid.value = sv[0] | sv[1] << 1
        dut.s_payload.value = ((pending[0][0] if pending[0] else 0)
                               | (pending[1][0] if pending[1] else 0) << wb)
        dut.m_ready.value = sum(int(rng.random() < job["p_ready"]) << k for k in (0, 1))
        await ReadOnly()
        s_ready, m_valid = int(dut.s_ready.value), int(dut.m_valid.value)
        m_ready, payload = int(dut.m_ready.value), int(dut.m_payload.value)
        busy = int(dut.dma_busy.value)
        for k in (0, 1):
            if sv[k] and s_ready >> k & 1:
                pending[k].pop(0)
            if m_valid >> k & 1 and m_ready >> k & 1:
                got[k].append(payload >> (k * wb) & mask)
        await _cycle(dut)
        cycles += 1
        if all(len(g) >= n for g, n in zip(got, want, strict=True)) and not busy \
                and not any(pending):
            break
    await ReadOnly()
    return {"mm2s": got, "cycles": cycles, "error": int(dut.dma_error.value),
            "busy": int(dut.dma_busy.value), "left": [len(p) for p in pending]}


@cocotb.test()
async def run_jobs(dut: Any) -> None:
    """Run every job of the jobs manifest and write ``results.json``."""
    spec = jobs_spec("tilewright.sim.memtile_sim.run_memtile_jobs")
    report: dict[str, Any] = {"jobs": [], "failure": None}
    try:
        for job in spec["jobs"]:
            report["jobs"].append(await _run(dut, job, int(spec["bd_index_bits"])))
            await _cycle(dut)
    except BaseException as e:
        report["failure"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(spec["results"]).write_text(json.dumps(report) + "\n")
