"""indexes for deadlines: the trail's deadline flags (the sweep), open requests' deadlines (counts)

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0013'
down_revision = '0012'
branch_labels = None
depends_on = None

FLAGS = sa.text("event IN ('at_risk', 'overdue')")


def upgrade() -> None:
    # benchmarks/scale.py: at 200,000 requests the sweep read every request at risk with its whole
    # trail on every pass (4.8 s); with this index it reads only the ones still missing a flag.
    op.create_index('ix_audit_events_deadline_flags', 'audit_events', ['request_id', 'event'], unique=False,
                    postgresql_where=FLAGS, sqlite_where=FLAGS)
    # The at-risk and overdue counts (dashboard, /metrics): index-only instead of a heap read per open request.
    op.create_index('ix_deletion_requests_status_due_at', 'deletion_requests', ['status', 'due_at', 'at_risk_from'],
                    unique=False)


def downgrade() -> None:
    op.drop_index('ix_deletion_requests_status_due_at', table_name='deletion_requests')
    op.drop_index('ix_audit_events_deadline_flags', table_name='audit_events')
