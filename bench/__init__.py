"""Benchmarks of fusepass against eager PyTorch, Inductor and IPEX (``python -m bench``).

Kept free of imports: workers (bench/measure.py) import this package in the IPEX
environment too, where only torch 2.8 and the stdlib can be relied on.
"""
