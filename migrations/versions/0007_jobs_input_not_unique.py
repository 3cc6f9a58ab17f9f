"""jobs: a model may run again on an input an earlier job of it had

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

# Unnamed in 0001: named here so that SQLite's batch copy can drop it (PostgreSQL's own
# name for it is jobs_study_id_model_version_id_input_digest_key).
_NAMING = {"uq": "%(table_name)s_%(column_0_N_name)s_key"}


def upgrade() -> None:
    # Under resend_policy = "replace" an image may go back to content it had (A, B, A):
    # the report in force is then B's, and A needs a job again (dicomai.jobs.assembler).
    with op.batch_alter_table('jobs', naming_convention=_NAMING) as batch_op:
        batch_op.drop_constraint('jobs_study_id_model_version_id_input_digest_key', type_='unique')
        batch_op.create_index('ix_jobs_study_model_input', ['study_id', 'model_version_id', 'input_digest'])


def downgrade() -> None:
    with op.batch_alter_table('jobs', naming_convention=_NAMING) as batch_op:
        batch_op.drop_index('ix_jobs_study_model_input')
        batch_op.create_unique_constraint(None, ['study_id', 'model_version_id', 'input_digest'])
