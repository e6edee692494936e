"""Software stack: assembler, numerics, PyTorch reference, compilers and the CLI."""
