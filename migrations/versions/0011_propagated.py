"""propagated: when every consumer of a request's model serves a version without its class; consumers can be removed

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

import service.db

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Requests completed before this revision stay completed here: the sweep propagates them
    # (service/consumers/propagation.py), with their audit events in the hash chain.
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('propagated_at', service.db.UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table('model_consumers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('removed_at', service.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.execute("UPDATE deletion_requests SET status = 'completed' WHERE status = 'propagated'")
    with op.batch_alter_table('model_consumers', schema=None) as batch_op:
        batch_op.drop_column('removed_at')
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.drop_column('propagated_at')
