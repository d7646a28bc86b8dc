"""assets: uploaded data sets and base models, by name and content hash

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03 18:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'tf_assets',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('kind', sa.String(length=16), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size', sa.BigInteger(), nullable=False),
        sa.Column('files', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('kind', 'name', 'sha256'),
    )
    op.create_index('ix_tf_assets_name', 'tf_assets', ['name'])


def downgrade() -> None:
    op.drop_index('ix_tf_assets_name', table_name='tf_assets')
    op.drop_table('tf_assets')
