"""Lethe's worker side: the pure unlearning engine (``worker.engine``) and, later, the Celery tasks."""
