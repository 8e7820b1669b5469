"""run-duration histogram counters, counted from the runs recorded so far

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-02
"""
from alembic import op
import sqlalchemy as sa

revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None

# service.deletion_requests.run_durations.BUCKETS when this was written: a migration is a snapshot.
BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)


def upgrade() -> None:
    counters = op.create_table(
        'run_duration_counters',
        sa.Column('name', sa.String(length=32), nullable=False),
        sa.Column('value', sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint('name', name=op.f('pk_run_duration_counters')),
    )
    # The runs recorded so far, as /metrics reported them before (each finished request's last run),
    # streamed: a database of 200,000 requests holds as many.
    requests = sa.table('deletion_requests', sa.column('status', sa.String), sa.column('started_at', sa.DateTime),
                        sa.column('finished_at', sa.DateTime))
    totals = {'count': 0.0, 'sum': 0.0, **{f'le:{float(b)}': 0.0 for b in BUCKETS}}
    rows = op.get_bind().execute(
        sa.select(requests.c.started_at, requests.c.finished_at).where(
            requests.c.status.in_(['completed', 'propagated', 'failed']),
            requests.c.started_at.is_not(None), requests.c.finished_at.is_not(None))
        .execution_options(yield_per=10_000))
    for started_at, finished_at in rows:
        seconds = max(0.0, (_aware(finished_at) - _aware(started_at)).total_seconds())
        totals['count'] += 1
        totals['sum'] += seconds
        for bound in BUCKETS:
            if seconds <= bound:
                totals[f'le:{float(bound)}'] += 1
    op.bulk_insert(counters, [{'name': name, 'value': value} for name, value in sorted(totals.items())])


def _aware(value):
    """SQLite hands back naive datetimes (UTC, as the service writes them); Postgres aware ones."""
    from datetime import timezone
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def downgrade() -> None:
    op.drop_table('run_duration_counters')
