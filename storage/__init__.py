"""Postgres (or SQLite) storage: models, sessions, and the queries the pipeline needs."""
