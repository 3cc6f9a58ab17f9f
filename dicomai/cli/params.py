"""Parameter types the commands share: a number outside what the database or numpy holds is
a one-line usage error (exit 2), not an OverflowError traceback or "database unavailable"."""

from __future__ import annotations

import click

# SQL BIGINT: the widest id either database stores.
ROW_ID = click.IntRange(1, 2**63 - 1)
LIMIT = click.IntRange(1, 1_000_000)
# numpy's and torch's seeds are 32-bit.
SEED = click.IntRange(0, 2**32 - 1)
