"""Sources of changes: PostgreSQL (warm-load, deltas), Redis announcements, timers."""
