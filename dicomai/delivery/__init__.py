"""Sending output objects to destinations: C-STORE SCU or a folder, retried with backoff."""
