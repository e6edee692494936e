# amaranth: UnusedElaboratable=no
"""The memtile in Amaranth's simulator: two S2MM channels fill two regions while two MM2S
channels, gated by locks the writers release, read them back through 2-D transposing and
padding descriptors and a negative stride; streams are throttled at random. Expected streams
come from the datamover model (sim/dm_model.py)."""

from pathlib import Path

import numpy as np
import pytest
from amaranth.sim import Simulator

from tilewright.hw.bd import BD_INDEX_BITS, BufferDescriptor, LockAction
from tilewright.hw.config import MemtileConfig
from tilewright.hw.memtile import CH_BITS, Memtile
from tilewright.sim.dm_model import run_mm2s, run_s2mm

SMALL = MemtileConfig(bytes=4096, banks=4, s2mm=2, mm2s=2, bds_per_channel=4, locks=16)
BLOCK = 4

# channel: BD list (index 0 starts the task)
BDS = {
    0: [BufferDescriptor(0, (8, 8), (1, 8), release=LockAction(0, 1))],
    1: [BufferDescriptor(512, (64,), (1,), release=LockAction(1, 1))],
    2: [BufferDescriptor(0, (8, 8), (8, 1), pad_before=(1, 1), pad_after=(1, 0),
                         acquire=LockAction(0, 1), release=LockAction(2, 1))],
    3: [BufferDescriptor(512 + 63, (32,), (-2,), acquire=LockAction(1, 1))],
}


@pytest.mark.parametrize("seed", [1, 2])
def test_memtile_channels_round_trip(seed):
    rng = np.random.default_rng(seed)
    words = SMALL.bytes // BLOCK
    streams_in = {ch: [int(v) for v in rng.integers(1, 1 << 31, 64)] for ch in (0, 1)}
    mem = np.zeros(words, dtype=np.int64)
    for ch in (0, 1):
        mem = np.asarray(run_s2mm(mem, {0: BDS[ch][0]}, 0, streams_in[ch]))
    want = {ch: run_mm2s(mem, {0: BDS[ch][0]}, 0) for ch in (2, 3)}
    dut = Memtile(SMALL, BLOCK)
    got: dict[int, list[int]] = {2: [], 3: []}
    state: dict = {}

    async def bench(ctx):
        for ch, bds in BDS.items():
            for idx, bd in enumerate(bds):
                ctx.set(dut.bd_we, 1)
                ctx.set(dut.bd_ch, ch)
                ctx.set(dut.bd_addr, idx)
                ctx.set(dut.bd_wdata.as_value(), bd.encode())
                await ctx.tick()
        ctx.set(dut.bd_we, 0)
        for ch in (2, 3, 0, 1):             # readers first: they must wait on their locks
            ctx.set(dut.task.valid, 1)
            ctx.set(dut.task.payload, ch << BD_INDEX_BITS)
            await ctx.tick()
        ctx.set(dut.task.valid, 0)
        pending = {ch: list(v) for ch, v in streams_in.items()}
        for _ in range(5000):
            for ch in (0, 1):
                ctx.set(dut.s2mm[ch].valid, bool(pending[ch]) and rng.random() < 0.6)
                ctx.set(dut.s2mm[ch].payload, pending[ch][0] if pending[ch] else 0)
            for i in (0, 1):
                ctx.set(dut.mm2s[i].ready, rng.random() < 0.6)
            for ch in (0, 1):
                if ctx.get(dut.s2mm[ch].valid) and ctx.get(dut.s2mm[ch].ready):
                    pending[ch].pop(0)
            for i in (0, 1):
                if ctx.get(dut.mm2s[i].valid) and ctx.get(dut.mm2s[i].ready):
                    got[2 + i].append(ctx.get(dut.mm2s[i].payload))
            await ctx.tick()
            if all(len(got[ch]) == len(want[ch]) for ch in (2, 3)) \
                    and not ctx.get(dut.dma_busy):
                break
        state["error"] = ctx.get(dut.dma_error)

    sim = Simulator(dut)
    sim.add_clock(1e-9)
    sim.add_testbench(bench)
    sim.run()
    assert not state["error"], f"seed {seed}: DMA error"
    for ch in (2, 3):
        diff = next((i for i, (a, b) in enumerate(zip(got[ch], want[ch], strict=False))
                     if a != b), None)
        assert got[ch] == want[ch], (f"seed {seed}: MM2S channel {ch}: {len(got[ch])} of "
                                     f"{len(want[ch])} words, first difference at {diff}")


def test_memtile_checks_arguments():
    with pytest.raises(ValueError, match="block must be 4, 8 or 16, not 5"):
        Memtile(SMALL, 5)
    with pytest.raises(TypeError, match="memtile must be a MemtileConfig"):
        Memtile({"bytes": 4096}, 4)
    assert CH_BITS >= 4


@pytest.mark.verilator
def test_memtile_rtl_random_descriptors():
    """cocotb + Verilator regression of the memtile the overlay builds (tiny-2x2's: 4 banks,
    2 + 2 channels): per job, both S2MM channels write a region through a chain of two random
    1- to 4-D BDs (gaps, overlaps, broadcast and reversed strides) and release a lock; both
    MM2S channels, queued first, wait on those locks and read the regions back through random
    chains with zero padding; random valid/ready on all four streams. Every MM2S stream must
    equal the datamover model's on the memory the model carries from job to job."""
    import dataclasses

    from tilewright.hw.config import load_config
    from tilewright.hw.overlay import array_memtile
    from tilewright.sim.dm_cases import random_bd
    from tilewright.sim.dm_model import task_words
    from tilewright.sim.memtile_sim import MemtileJob, run_memtile_jobs

    cfg = load_config(Path(__file__).resolve().parents[1] / "overlay_configs" / "tiny-2x2.yaml")
    # the array's memtile with its two weight MM2S channels (the harness has 2 + 2)
    mcfg, block = dataclasses.replace(array_memtile(cfg), mm2s=2), cfg.tile.block
    words = mcfg.bytes // block
    # small regions, so that the random reads mostly hit words the random writes wrote
    regions = ((0, 160), (words - 160, words))
    mem = np.zeros(words, dtype=np.int64)
    jobs, want = [], []
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        bds: dict[int, list[BufferDescriptor]] = {}
        streams = []
        for k in (0, 1):
            w = [random_bd(rng, direction="s2mm", dims=4, region=regions[k]) for _ in range(2)]
            bds[k] = [dataclasses.replace(w[0], next_bd=1),
                      dataclasses.replace(w[1], release=LockAction(k, 1))]
            r = [random_bd(rng, direction="mm2s", dims=4, region=regions[k]) for _ in range(2)]
            bds[2 + k] = [dataclasses.replace(r[0], next_bd=1, acquire=LockAction(k, 1)), r[1]]
            n = task_words(dict(enumerate(bds[k])), 0)
            streams.append([int(v) for v in rng.integers(1, 1 << 31, n)])
        for k in (0, 1):
            mem = np.asarray(run_s2mm(mem, dict(enumerate(bds[k])), 0, streams[k]))
        outs = [run_mm2s(mem, dict(enumerate(bds[2 + k])), 0) for k in (0, 1)]
        want.append(outs)
        jobs.append(MemtileJob(bds, [2, 3, 0, 1], (streams[0], streams[1]),
                               (len(outs[0]), len(outs[1])),
                               p_valid=float(rng.uniform(0.2, 1.0)),
                               p_ready=float(rng.uniform(0.2, 1.0)), seed=seed))
    results = run_memtile_jobs(mcfg, block, jobs)
    for seed, (res, outs) in enumerate(zip(results, want, strict=True)):
        assert not res["error"] and not res["busy"] and res["left"] == [0, 0], (seed, res)
        for k in (0, 1):
            assert res["mm2s"][k] == [int(v) for v in outs[k]], \
                f"seed {seed}: MM2S {k}: {len(res['mm2s'][k])} of {len(outs[k])} words"
