"""An application package with a Celery app of its own (see ../README.md)."""
