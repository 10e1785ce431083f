"""Instruction sets: the paper's splits and seeded samples, JailbreakBench, user files (`instructions`) and
XSTest (`xstest`), read from a data directory or downloaded from pinned URLs with checksums."""
