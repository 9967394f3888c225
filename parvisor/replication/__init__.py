"""Replicated VM storage: the protocol and placement (pure) and the QEMU engine."""
