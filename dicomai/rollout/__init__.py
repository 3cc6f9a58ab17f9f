"""The model registry and deployment states, recorded in SQL with their audit rows."""
