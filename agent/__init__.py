"""config-agent: runtime settings from PostgreSQL, pushed to every pod in milliseconds."""

__version__ = "0.1.0"
