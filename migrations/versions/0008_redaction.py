"""redaction: a request's subject nonce and commitment, and when its personal data was redacted

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

import service.db

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.add_column(sa.Column('subject_nonce', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('subject_commitment', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('redacted_at', service.db.UTCDateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deletion_requests', schema=None) as batch_op:
        batch_op.drop_column('redacted_at')
        batch_op.drop_column('subject_commitment')
        batch_op.drop_column('subject_nonce')
