"""Activities: thin, idempotent wrappers around the clients that do the work."""
