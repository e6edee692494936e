"""The command protocol shared by the cocotb modules that drive Verilog harnesses
(:mod:`tilewright.sim.tile_tb`, :mod:`tilewright.sim.datamover_tb`).

A harness takes a command on ``cmd`` / ``job`` with ``cmd_valid`` and answers on ``cmd_done``
(four-phase handshake) and ``bad_cmd``; the runner passes the jobs manifest as
``+TW_JOBS=<jobs.json>``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cocotb
from cocotb.triggers import FallingEdge, RisingEdge, SimTimeoutError, with_timeout

__all__ = ["command", "jobs_spec"]


def jobs_spec(runner: str) -> dict[str, Any]:
    """The jobs manifest named by ``+TW_JOBS`` (or ``TILEWRIGHT_JOBS``); ``runner`` names the
    Python function that writes it, for the error message."""
    path = cocotb.plusargs.get("TW_JOBS") or os.environ.get("TILEWRIGHT_JOBS")
    if not isinstance(path, str) or not path:
        raise AssertionError(f"no jobs manifest: pass +TW_JOBS=<jobs.json> (or set "
                             f"TILEWRIGHT_JOBS); {runner} does")
    return json.loads(Path(path).read_text())


async def command(dut: Any, cmd: int, job: int, limit_cycles: int, clock_ns: int, *,
                  name: str, slack: int) -> None:
    """Issue one harness command and wait for it to end, at most ``limit_cycles + slack``
    cycles; a harness that stops answering fails the job with a message, never hangs."""
    dut.cmd.value = cmd
    dut.job.value = job
    dut.cmd_valid.value = 1
    try:
        await with_timeout(RisingEdge(dut.cmd_done), (limit_cycles + slack) * clock_ns, "ns")
        dut.cmd_valid.value = 0
        await with_timeout(FallingEdge(dut.cmd_done), slack * clock_ns, "ns")
    except SimTimeoutError:
        raise AssertionError(f"job {job}: the harness did not finish {name} within "
                             f"{limit_cycles + slack} cycles; the harness is stuck") from None
    if int(dut.bad_cmd.value):
        raise AssertionError(f"job {job}: the harness rejected command {cmd}")
