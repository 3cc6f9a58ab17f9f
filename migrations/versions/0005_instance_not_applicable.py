"""instances no model may process: non-image SOP classes and dicomai's own results

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24
"""

from alembic import op
import sqlalchemy as sa
from pydicom.uid import UID

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('not_applicable', sa.String(length=128), nullable=True))
    # Instances received before: marked by SOP class (their Manufacturer was not recorded).
    instances = sa.table(
        'instances',
        sa.column('sop_class_uid', sa.String),
        sa.column('not_applicable', sa.String),
    )
    bind = op.get_bind()
    classes = bind.execute(sa.select(instances.c.sop_class_uid).distinct()).scalars().all()
    for sop_class_uid in classes:
        reason = _not_an_image(sop_class_uid)
        if reason is not None:
            bind.execute(
                instances.update()
                .where(instances.c.sop_class_uid == sop_class_uid)
                .values(not_applicable=reason)
            )


def _not_an_image(sop_class_uid: str) -> str | None:
    """`dicomai.ingest.usable.not_applicable` as of this revision, for the SOP class alone
    (a migration must not change with the code it migrates)."""
    uid = UID(sop_class_uid)
    if not uid.startswith("1.2.840.10008.5.1.4.1.1.") or uid.type != "SOP Class":
        return None
    return None if "Image Storage" in uid.name else f"not an image ({uid.name})"


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('not_applicable')
