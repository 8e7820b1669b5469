"""model events: the audit trail of a model's settings (its evaluation and anchor sets)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

import service.db


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_events',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.Column('at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('actor', sa.String(length=200), nullable=False),
    sa.Column('event', sa.String(length=40), nullable=False),
    sa.Column('detail', sa.JSON(), nullable=True),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_events'))
    )
    with op.batch_alter_table('model_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_events_model_id'), ['model_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('model_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_events_model_id'))
    op.drop_table('model_events')
