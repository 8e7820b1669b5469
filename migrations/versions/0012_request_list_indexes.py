"""indexes for paging deletion requests oldest first, alone, by status and by model

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-02
"""
from alembic import op

revision = '0012'
down_revision = '0011'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # benchmarks/scale.py: at 200,000 requests each page of GET /deletion-requests sorted every
    # matching row (a 180-240 ms statement); these let it read a page's rows off the index.
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.create_index('ix_deletion_requests_created_at_id', ['created_at', 'id'], unique=False)
        batch_op.create_index('ix_deletion_requests_status_created_at_id', ['status', 'created_at', 'id'], unique=False)
        batch_op.create_index('ix_deletion_requests_model_created_at_id', ['model_id', 'created_at', 'id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.drop_index('ix_deletion_requests_model_created_at_id')
        batch_op.drop_index('ix_deletion_requests_status_created_at_id')
        batch_op.drop_index('ix_deletion_requests_created_at_id')
