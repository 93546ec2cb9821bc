"""Shared setup for the NanoGPT-zoo tests: one intra-op thread per test (``support.threads``)."""
from support.threads import one_intra_op_thread  # noqa: F401
