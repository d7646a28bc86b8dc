"""pause and resume: a paused trial keeps its lease row (state paused) with its checkpoint; reports store
the server's action (continue, prune or pause)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 12:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('tf_leases') as batch_op:
        batch_op.add_column(sa.Column('held_seconds', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('paused_at', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('checkpoint', sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column('promoted_through', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('resumes', sa.Integer(), nullable=False, server_default='0'))
    with op.batch_alter_table('tf_reports') as batch_op:
        batch_op.add_column(sa.Column('action', sa.String(length=8), nullable=False, server_default='continue'))
    op.execute("UPDATE tf_reports SET action = 'prune' WHERE prune")


def downgrade() -> None:
    # Paused trials cannot exist before this revision: they end as pruned, as a prune would have left them.
    op.execute("UPDATE tf_leases SET state = 'pruned' WHERE state = 'paused'")
    with op.batch_alter_table('tf_reports') as batch_op:
        batch_op.drop_column('action')
    with op.batch_alter_table('tf_leases') as batch_op:
        batch_op.drop_column('resumes')
        batch_op.drop_column('promoted_through')
        batch_op.drop_column('checkpoint')
        batch_op.drop_column('paused_at')
        batch_op.drop_column('held_seconds')
