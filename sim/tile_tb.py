"""cocotb test module driving ``tw_tile_harness`` (``sim/harness/tile_harness.sv``).

Run by :func:`tilewright.sim.verilator.run_tile_jobs`, which writes the job files and a jobs
manifest and passes ``+TW_JOBS=<jobs.json>`` and ``+TW_DIR=<run dir>``. For every job the
test issues LOAD_PM, LOAD_DM, START and DUMP_DM to the harness and records the tile's status
ports; it writes ``results.json`` (also after a failure, with the jobs that finished).

The clock runs inside the harness: Python awaits only the end of each command, so the
simulator runs free. Every wait is bounded: the harness stops a START after
``timeout_cycles`` (the job is reported ``timed_out``, the tile is reset and the next job
runs), and each command is also guarded in Python by :func:`cocotb.triggers.with_timeout` in
case the harness itself stops answering.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cocotb

from tilewright.sim.harness_protocol import command, jobs_spec

CMD_LOAD_PM = 1
CMD_LOAD_DM = 2
CMD_START = 3
CMD_DUMP_DM = 4
CMD_RESET = 5
_CMD_NAMES = {CMD_LOAD_PM: "LOAD_PM", CMD_LOAD_DM: "LOAD_DM", CMD_START: "START",
              CMD_DUMP_DM: "DUMP_DM", CMD_RESET: "RESET"}
#: Slack on every command's limit, in cycles (handshake, reset, read pipeline).
_SLACK = 64


def _jobs_spec() -> dict[str, Any]:
    return jobs_spec("tilewright.sim.verilator.run_tile_jobs")


async def _command(dut: Any, cmd: int, job: int, limit_cycles: int, clock_ns: int) -> None:
    await command(dut, cmd, job, limit_cycles, clock_ns, name=_CMD_NAMES[cmd], slack=_SLACK)


@cocotb.test()
async def run_jobs(dut: Any) -> None:
    """Run every job of the jobs manifest and write ``results.json``."""
    spec = _jobs_spec()
    clock_ns = int(spec.get("clock_ns", 10))
    timeout = int(spec["timeout_cycles"])
    pm_words, dm_words = int(spec["pmem_words"]), int(spec["dmem_words"])
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"jobs": results, "failure": None}
    dut.cmd_valid.value = 0
    dut.cmd.value = 0
    dut.job.value = 0
    dut.timeout_cycles.value = timeout
    try:
        for i in range(int(spec["jobs"])):
            t0 = time.perf_counter()
            await _command(dut, CMD_LOAD_PM, i, pm_words, clock_ns)
            await _command(dut, CMD_LOAD_DM, i, dm_words, clock_ns)
            t1 = time.perf_counter()
            await _command(dut, CMD_START, i, timeout, clock_ns)
            t2 = time.perf_counter()
            timed_out = bool(int(dut.timed_out.value))
            r = {
                "index": i,
                "timed_out": timed_out,
                "run_cycles": int(dut.run_cycles.value),
                "done": int(dut.done.value),
                "busy": int(dut.busy.value),
                "cycles": int(dut.cycles.value),
                "error": int(dut.error.value),
                "error_code": int(dut.error_code.value),
                "error_pc": int(dut.error_pc.value),
                "start_wall_s": t2 - t1,
            }
            if timed_out:
                dut._log.error("job %d: no done within %d cycles (timeout_cycles); resetting "
                               "the tile", i, timeout)
                await _command(dut, CMD_RESET, i, 8, clock_ns)
            t3 = time.perf_counter()
            await _command(dut, CMD_DUMP_DM, i, dm_words + 4, clock_ns)
            r["io_wall_s"] = (t1 - t0) + (time.perf_counter() - t3)
            results.append(r)
    except BaseException as e:
        report["failure"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(spec["results"]).write_text(json.dumps(report, indent=1) + "\n")
    late = [r["index"] for r in results if r["timed_out"]]
    assert not late, (f"job(s) {late} did not finish within {timeout} cycles "
                      f"(timeout_cycles): the tile never raised done")
