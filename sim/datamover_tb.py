"""cocotb test module driving ``tw_dm_harness`` (``sim/harness/dm_harness.sv``).

Run by :func:`tilewright.sim.datamover_sim.run_datamover_jobs`, which writes the job files
and a jobs manifest (``+TW_JOBS=<jobs.json>``, ``+TW_DIR=<run dir>``). For every job the test
sets the job's counts, seed and back-pressure thresholds, issues LOAD, START and DUMP, and
records the harness's status ports; it writes ``results.json`` (also after a failure, with the
jobs that finished).

The clock runs inside the harness and Python awaits only the end of each command. Every wait
is bounded: START ends after the job's ``timeout_cycles`` at the latest (reported as
``timed_out``), and each command is also guarded by :func:`cocotb.triggers.with_timeout` in
case the harness itself stops answering.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import cocotb

from tilewright.sim.harness_protocol import command, jobs_spec

CMD_LOAD = 1
CMD_START = 2
CMD_DUMP = 3
_CMD_NAMES = {CMD_LOAD: "LOAD", CMD_START: "START", CMD_DUMP: "DUMP"}
#: Slack on every command's limit, in cycles (handshake, reset, initialisation).
_SLACK = 256

#: Harness outputs recorded after START (name in results.json = port name).
_STATUS = (
    "timed_out", "run_cycles", "mm2s_first_busy", "mm2s_last_busy", "s2mm_first_busy",
    "s2mm_last_busy", "out_words", "in_words", "out_overflow", "mm2s_done", "s2mm_done",
    "mm2s_busy", "s2mm_busy", "mm2s_error", "s2mm_error", "mm2s_lock_req", "mm2s_lock_op",
    "mm2s_lock_id", "mm2s_lock_val", "s2mm_lock_req", "s2mm_lock_op", "s2mm_lock_id",
    "s2mm_lock_val", "lock_overflow", "lock_bad_id", "lock_error_id",
)


def _jobs_spec() -> dict[str, Any]:
    return jobs_spec("tilewright.sim.datamover_sim.run_datamover_jobs")


async def _command(dut: Any, cmd: int, job: int, limit_cycles: int, clock_ns: int) -> None:
    await command(dut, cmd, job, limit_cycles, clock_ns, name=_CMD_NAMES[cmd], slack=_SLACK)


@cocotb.test()
async def run_jobs(dut: Any) -> None:
    """Run every job of the jobs manifest and write ``results.json``."""
    spec = _jobs_spec()
    clock_ns = int(spec["clock_ns"])
    init_cycles = int(spec["init_cycles"])
    results: list[dict[str, Any]] = []
    report: dict[str, Any] = {"jobs": results, "failure": None}
    dut.cmd_valid.value = 0
    dut.cmd.value = 0
    dut.job.value = 0
    try:
        for i, job in enumerate(spec["jobs"]):
            for port in ("seed", "n_tasks_mm2s", "n_tasks_s2mm", "n_in_words", "timeout_cycles",
                         "thr_out_ready", "thr_in_valid", "thr_rd_grant", "thr_wr_grant"):
                getattr(dut, port).value = int(job[port])
            t0 = time.perf_counter()
            await _command(dut, CMD_LOAD, i, init_cycles, clock_ns)
            t1 = time.perf_counter()
            await _command(dut, CMD_START, i, int(job["timeout_cycles"]), clock_ns)
            t2 = time.perf_counter()
            r: dict[str, Any] = {"index": i, "start_wall_s": t2 - t1}
            r.update({name: int(getattr(dut, name).value) for name in _STATUS})
            await _command(dut, CMD_DUMP, i, init_cycles, clock_ns)
            r["io_wall_s"] = (t1 - t0) + (time.perf_counter() - t2)
            results.append(r)
            if r["timed_out"]:
                dut._log.error("job %d (seed %d): not finished within %d cycles",
                               i, job["seed"], job["timeout_cycles"])
    except BaseException as e:
        report["failure"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        Path(spec["results"]).write_text(json.dumps(report, indent=1) + "\n")
