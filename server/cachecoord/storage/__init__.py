"""Redis and PostgreSQL access: keys, envelopes, Lua scripts, tables."""
