"""Compiled kernels (Cython). Every module here is built from a .pyx file by setup.py."""
