"""cachecoord: a gRPC cache-coordination service over Redis and PostgreSQL."""

__version__ = "0.1.0"
