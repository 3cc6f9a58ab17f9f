"""SQLAlchemy 2 ORM tables and session handling; no business logic."""
