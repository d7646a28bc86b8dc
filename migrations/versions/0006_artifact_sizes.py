"""artifact sizes in 64 bits: a full fine-tuning's weights pass 2 GiB (a 1B-parameter model in bf16), which a
32-bit column refused on PostgreSQL ("integer out of range") while the upload limit allows 20 GiB

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 20:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tf_artifacts') as batch_op:
        batch_op.alter_column('size', existing_type=sa.Integer(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    # Refused by PostgreSQL while an artifact of 2 GiB or more is recorded: delete those rows first.
    with op.batch_alter_table('tf_artifacts') as batch_op:
        batch_op.alter_column('size', existing_type=sa.BigInteger(), type_=sa.Integer(), existing_nullable=False)
