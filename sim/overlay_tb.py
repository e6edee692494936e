"""cocotb test module driving ``tw_overlay_harness`` (``sim/harness/overlay_harness.sv``).

Run by :func:`tilewright.sim.overlay_sim.run_overlay_jobs`, which writes the job files and a
jobs manifest. For every job: LOAD_DDR (not for a job that shares the previous one's image),
LOAD_CFG, START, STATUS (the watchdog's report: who waits on which lock), DUMP_DDR; a job
that timed out or stalled is followed by RESET. The
clock runs inside the harness; Python only waits for each command's end, every wait bounded.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cocotb

from tilewright.sim.harness_protocol import command, jobs_spec

CMD_LOAD_CFG = 1
CMD_LOAD_DDR = 2
CMD_START = 3
CMD_DUMP_DDR = 4
CMD_RESET = 5
CMD_STATUS = 6
_CMD_NAMES = {CMD_LOAD_CFG: "LOAD_CFG", CMD_LOAD_DDR: "LOAD_DDR", CMD_START: "START",
              CMD_DUMP_DDR: "DUMP_DDR", CMD_RESET: "RESET", CMD_STATUS: "STATUS"}
_SLACK = 64


async def _command(dut: Any, cmd: int, job: int, limit_cycles: int, clock_ns: int) -> None:
    await command(dut, cmd, job, limit_cycles, clock_ns, name=_CMD_NAMES[cmd], slack=_SLACK)


@cocotb.test()
async def run_jobs(dut: Any) -> None:
    """Run every job of the jobs manifest and write ``results.json``."""
    spec = jobs_spec("tilewright.sim.overlay_sim.run_overlay_jobs")
    clock_ns = int(spec.get("clock_ns", 10))
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"jobs": results, "failure": None}
    dut.cmd_valid.value = 0
    dut.cmd.value = 0
    dut.job.value = 0
    try:
        for i, job in enumerate(spec["job_list"]):
            timeout = int(job["timeout_cycles"])
            dut.timeout_cycles.value = timeout
            dut.watchdog_cycles.value = int(job["watchdog_cycles"])
            dut.dump_lo.value = int(job["dump_lo"])
            dut.dump_hi.value = int(job["dump_hi"])
            t0 = time.perf_counter()
            if job.get("load_ddr", True):
                await _command(dut, CMD_LOAD_DDR, i, 4, clock_ns)
            await _command(dut, CMD_LOAD_CFG, i, 4 * int(job["cfg_records"]) + 16, clock_ns)
            t1 = time.perf_counter()
            await _command(dut, CMD_START, i, timeout, clock_ns)
            t2 = time.perf_counter()
            r = {
                "index": i,
                "timed_out": bool(int(dut.timed_out.value)),
                "stalled": bool(int(dut.stalled.value)),
                "run_cycles": int(dut.run_cycles.value),
                "cycles": int(dut.cycles.value),
                "done": int(dut.done.value),
                "error": int(dut.error.value),
                "ddr_oob": int(dut.ddr_oob.value),
                "rd_words": int(dut.rd_words.value),
                "wr_words": int(dut.wr_words.value),
                "cfg_records": int(dut.cfg_records.value),
                "start_wall_s": t2 - t1,
            }
            await _command(dut, CMD_STATUS, i, int(spec["units"]) + 4, clock_ns)
            if r["timed_out"] or r["stalled"]:
                await _command(dut, CMD_RESET, i, 8, clock_ns)
            t3 = time.perf_counter()
            await _command(dut, CMD_DUMP_DDR, i, 4, clock_ns)
            r["io_wall_s"] = (t1 - t0) + (time.perf_counter() - t3)
            results.append(r)
    except BaseException as e:
        report["failure"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(spec["results"]).write_text(json.dumps(report, indent=1) + "\n")
