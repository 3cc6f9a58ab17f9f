"""rollout (evaluation, previous active version), instance routing attributes, audit hash chain

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23

Audit rows written before this revision keep NULL hashes; the chain starts at the first row
written after it (`dicomai audit verify` reports how many rows precede it).
"""

from alembic import op
import sqlalchemy as sa

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

_PREVIOUS_FK = 'fk_model_versions_previous_active_id'


def upgrade() -> None:
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('prev_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('hash', sa.String(length=64), nullable=True))
        batch_op.create_index('ix_audit_events_hash', ['hash'], unique=True)

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('view_position', sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column('series_description', sa.String(length=64), nullable=True))

    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('evaluation', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('previous_active_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(_PREVIOUS_FK, 'model_versions', ['previous_active_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('model_versions', schema=None) as batch_op:
        batch_op.drop_constraint(_PREVIOUS_FK, type_='foreignkey')
        batch_op.drop_column('previous_active_id')
        batch_op.drop_column('evaluation')

    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('series_description')
        batch_op.drop_column('view_position')

    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index('ix_audit_events_hash')
        batch_op.drop_column('hash')
        batch_op.drop_column('prev_hash')
