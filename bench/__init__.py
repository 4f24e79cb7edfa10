"""Benchmarks: ``python -m bench <scenario>``."""

import os

# The benchmark forks (to start PostgreSQL as its own user) from a process
# with gRPC threads, whose fork handlers then crash the child.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
