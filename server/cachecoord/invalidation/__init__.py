"""Invalidation fabric: the pub/sub bus and the transactional outbox."""
