"""Simulation: the golden model, Verilator builds and cocotb test benches."""
