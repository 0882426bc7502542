"""Differential conformance: the model against the real Linux pKVM under QEMU."""
