"""Celery wiring: the app and its thin tasks."""
