"""Benchmarks of no single stage (the fused kernel); each stage's own is ``rhocli/<stage>/bench.py``."""
