"""Fixtures shared by several test modules."""

from amalgamation_fixtures import idx_data  # noqa: F401  (the session's small IDX dataset)
