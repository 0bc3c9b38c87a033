"""kw-backup: backups and restores of kw-app's PostgreSQL database."""

__version__ = "0.1.0"
