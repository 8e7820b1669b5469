"""consumers: a model's inference services and the versions they acknowledge serving

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-01
"""
from alembic import op
import sqlalchemy as sa

import service.db

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('model_consumers',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('model_id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('api_key_name', sa.String(length=200), nullable=False),
    sa.Column('created_at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('created_by', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['model_id'], ['registered_models.id'], name=op.f('fk_model_consumers_model_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_model_consumers')),
    sa.UniqueConstraint('model_id', 'name', name=op.f('uq_model_consumers_model_id'))
    )
    with op.batch_alter_table('model_consumers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_model_consumers_model_id'), ['model_id'], unique=False)
    op.create_table('consumer_acknowledgements',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('consumer_id', sa.String(length=36), nullable=False),
    sa.Column('version_id', sa.String(length=36), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('at', service.db.UTCDateTime(timezone=True), nullable=False),
    sa.Column('by', sa.String(length=200), nullable=False),
    sa.ForeignKeyConstraint(['consumer_id'], ['model_consumers.id'], name=op.f('fk_consumer_acknowledgements_consumer_id')),
    sa.ForeignKeyConstraint(['version_id'], ['model_versions.id'], name=op.f('fk_consumer_acknowledgements_version_id')),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_consumer_acknowledgements'))
    )
    with op.batch_alter_table('consumer_acknowledgements', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_consumer_acknowledgements_consumer_id'), ['consumer_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('consumer_acknowledgements', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_consumer_acknowledgements_consumer_id'))
    op.drop_table('consumer_acknowledgements')
    with op.batch_alter_table('model_consumers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_model_consumers_model_id'))
    op.drop_table('model_consumers')
