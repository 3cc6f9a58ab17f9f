"""transfers: the associations sending each study, seen by every listener process

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02
"""

from alembic import op
import sqlalchemy as sa

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # With complete_on_association_end, a study sent on parallel associations held by two
    # listener processes closed at the first release: each process saw only its own.
    op.create_table(
        'transfers',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('association', sa.String(length=32), nullable=False),
        sa.Column('listener', sa.String(length=300), nullable=False),
        sa.Column('study_uid', sa.String(length=64), nullable=False),
        sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('association', 'study_uid'),
    )
    op.create_index('ix_transfers_study_uid', 'transfers', ['study_uid'])


def downgrade() -> None:
    op.drop_index('ix_transfers_study_uid', table_name='transfers')
    op.drop_table('transfers')
