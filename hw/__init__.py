"""Hardware generators: the overlay configuration, the tile ISA and Amaranth RTL."""
