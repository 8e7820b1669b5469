"""compare-and-set and bounded batches: deletion requests carry a row version and a run-alone flag,
a model's run lease a fencing token; idempotency keys are scoped to their sender

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('row_version', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('run_alone', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.drop_constraint('uq_deletion_requests_idempotency_key', type_='unique')
        batch_op.create_unique_constraint('uq_deletion_requests_idempotency_scope', ['created_by', 'idempotency_key'])
    with op.batch_alter_table('registered_models', schema=None) as batch_op:
        batch_op.add_column(sa.Column('run_lease_token', sa.Integer(), nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('registered_models', schema=None) as batch_op:
        batch_op.drop_column('run_lease_token')
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.drop_constraint('uq_deletion_requests_idempotency_scope', type_='unique')
        batch_op.create_unique_constraint('uq_deletion_requests_idempotency_key', ['idempotency_key'])
        batch_op.drop_column('run_alone')
        batch_op.drop_column('row_version')
