"""jobs.reported: whether a job's results are its model's report on the study

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-25
"""

from alembic import op
import sqlalchemy as sa

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(
            sa.Column('reported', sa.Boolean(), server_default=sa.false(), nullable=False)
        )
    # Before, a job had reported if its outputs were given to a destination; a job that
    # reported where no destination was configured cannot be told from a silent one.
    jobs = sa.table('jobs', sa.column('id', sa.Integer), sa.column('reported', sa.Boolean))
    outputs = sa.table('output_objects', sa.column('id', sa.Integer), sa.column('job_id', sa.Integer))
    deliveries = sa.table('deliveries', sa.column('output_id', sa.Integer))
    given = (
        sa.select(outputs.c.id)
        .join(deliveries, deliveries.c.output_id == outputs.c.id)
        .where(outputs.c.job_id == jobs.c.id)
        .exists()
    )
    op.get_bind().execute(jobs.update().where(given).values(reported=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('reported')
