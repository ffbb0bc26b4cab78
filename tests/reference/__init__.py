"""Small, obviously correct pure-Python references of the Rust core's semantics.

The test-suite compares the compiled module against these; the benchmarks use them as the peer.
"""
