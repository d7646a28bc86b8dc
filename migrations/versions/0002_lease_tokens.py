"""lease tokens: only the holder of a lease may change its trial; lease request ids scoped per worker

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28 10:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# 0001 created `UNIQUE (request_id)` without a name: PostgreSQL named it itself; on SQLite the batch
# copy reflects it unnamed, and this naming convention gives it the name dropped below.
_SQLITE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def _old_unique_name() -> str:
    return "tf_leases_request_id_key" if op.get_bind().dialect.name == "postgresql" else "uq_tf_leases_request_id"


def upgrade() -> None:
    with op.batch_alter_table('tf_leases', naming_convention=_SQLITE_NAMES) as batch_op:
        batch_op.add_column(sa.Column('token_hash', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('owner_token_id', sa.Integer(), nullable=True))
        batch_op.drop_constraint(_old_unique_name(), type_='unique')
        batch_op.create_unique_constraint('uq_tf_leases_worker_request', ['worker_id', 'request_id'])


def downgrade() -> None:
    with op.batch_alter_table('tf_leases', naming_convention=_SQLITE_NAMES) as batch_op:
        batch_op.drop_constraint('uq_tf_leases_worker_request', type_='unique')
        batch_op.create_unique_constraint(_old_unique_name(), ['request_id'])
        batch_op.drop_column('owner_token_id')
        batch_op.drop_column('token_hash')
