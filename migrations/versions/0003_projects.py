"""projects: studies belong to a project; tokens are granted projects (read or write)

Existing studies go to the project "default" (id 1); existing user tokens get write access to it, so
they keep seeing what they saw. Worker tokens get no grant: a worker without grants serves every project.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-28 10:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'tf_projects',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=200), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('name'),
    )
    op.execute("INSERT INTO tf_projects (id, name, created_at) VALUES (1, 'default', CURRENT_TIMESTAMP)")
    if op.get_bind().dialect.name == 'postgresql':  # the explicit id 1 must not be handed out again
        op.execute("SELECT setval(pg_get_serial_sequence('tf_projects', 'id'), 1)")
    op.create_table(
        'tf_grants',
        sa.Column('token_id', sa.Integer(), nullable=False),
        sa.Column('project_id', sa.Integer(), nullable=False),
        sa.Column('access', sa.String(length=8), nullable=False),
        sa.ForeignKeyConstraint(['project_id'], ['tf_projects.id'], ondelete='CASCADE'),
        sa.ForeignKeyConstraint(['token_id'], ['tf_tokens.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('token_id', 'project_id'),
    )
    op.execute("INSERT INTO tf_grants (token_id, project_id, access) "
               "SELECT id, 1, 'write' FROM tf_tokens WHERE role = 'user'")
    with op.batch_alter_table('tf_studies') as batch_op:
        batch_op.add_column(sa.Column('project_id', sa.Integer(), nullable=False, server_default='1'))
        batch_op.create_index('ix_tf_studies_project_id', ['project_id'])
        batch_op.create_foreign_key('fk_tf_studies_project_id', 'tf_projects', ['project_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('tf_studies') as batch_op:
        batch_op.drop_constraint('fk_tf_studies_project_id', type_='foreignkey')
        batch_op.drop_index('ix_tf_studies_project_id')
        batch_op.drop_column('project_id')
    op.drop_table('tf_grants')
    op.drop_table('tf_projects')
