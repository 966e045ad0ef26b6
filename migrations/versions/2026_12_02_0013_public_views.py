"""the public SQL contract: labeled_clean, labeled_rejected, label_stats, teacher_spend

Views, not tables: they read the base tables as they are, so they are never stale, and a
later migration that reshapes a base table recreates them with the same columns (the test
in tests/migrations/test_views.py holds the columns, so a consumer's query keeps working).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02 06:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

VIEWS = ("labeled_clean", "labeled_rejected", "label_stats", "teacher_spend")


def _json(dialect: str) -> dict[str, str]:
    """The few expressions that differ between Postgres (JSONB) and SQLite (JSON text)."""
    if dialect == "postgresql":
        return {
            "label": "l.output->>'label'",
            "spec_model": "s.body->'teacher'->>'model'",
            "slices": "jsonb_each_text(b.slices) AS e(key, value)",
            "slice_value": "e.value",
            "day": "CAST((c.created_at AT TIME ZONE 'UTC') AS date)",
        }
    return {
        "label": "json_extract(l.output, '$.label')",
        "spec_model": "json_extract(s.body, '$.teacher.model')",
        "slices": "json_each(b.slices) AS e",
        "slice_value": "CAST(e.value AS TEXT)",
        "day": "date(c.created_at)",
    }


def _labeled(j: dict[str, str], extra: str, where: str) -> str:
    """One row per label and submitted id: the item's own id, and every id whose text
    repeated it (item_aliases), so each id a producer sent finds its label."""
    columns = f"""
        i.id AS item_id, l.id AS label_id, i.text, i.slices, l.output, l.confidence,
        l.agreement, i.known_good, l.known_good_match, s.name AS spec_name,
        s.version AS spec_version, COALESCE(r.model, {j["spec_model"]}) AS teacher_model,
        l.created_at AS labeled_at{extra}"""
    joins = """
        JOIN specs s ON s.id = l.spec_id
        LEFT JOIN teacher_responses r ON r.request_hash = l.request_hash"""
    return f"""
        SELECT i.external_id, {columns}
        FROM labels l JOIN items i ON i.id = l.item_id {joins}
        WHERE {where}
        UNION ALL
        SELECT a.external_id, {columns}
        FROM labels l JOIN items i ON i.id = l.item_id
        JOIN item_aliases a ON a.item_id = i.id {joins}
        WHERE {where}"""


def _label_stats(j: dict[str, str]) -> str:
    """Per spec, version, slice value and class: overall rows have a NULL slice_name."""
    return f"""
        WITH b AS (
            SELECT s.name AS spec_name, s.version AS spec_version, {j["label"]} AS class,
                   l.verdict, l.known_good_match, i.slices
            FROM labels l JOIN items i ON i.id = l.item_id JOIN specs s ON s.id = l.spec_id
        ), sliced AS (
            SELECT spec_name, spec_version, CAST(NULL AS TEXT) AS slice_name,
                   CAST(NULL AS TEXT) AS slice_value, class, verdict, known_good_match
            FROM b
            UNION ALL
            SELECT spec_name, spec_version, e.key, {j["slice_value"]}, class, verdict,
                   known_good_match
            FROM b, {j["slices"]}
        )
        SELECT spec_name, spec_version, slice_name, slice_value, class,
               COUNT(*) AS labels,
               SUM(CASE WHEN verdict = 'accepted' THEN 1 ELSE 0 END) AS accepted,
               SUM(CASE WHEN verdict = 'rejected' THEN 1 ELSE 0 END) AS rejected,
               SUM(CASE WHEN verdict = 'needs_review' THEN 1 ELSE 0 END) AS needs_review,
               SUM(CASE WHEN known_good_match IS NOT NULL THEN 1 ELSE 0 END) AS with_known_good,
               SUM(CASE WHEN known_good_match THEN 1 ELSE 0 END) AS known_good_agree,
               CAST(SUM(CASE WHEN known_good_match THEN 1 ELSE 0 END) AS FLOAT)
                   / NULLIF(SUM(CASE WHEN known_good_match IS NOT NULL THEN 1 ELSE 0 END), 0)
                   AS known_good_agreement
        FROM sliced
        GROUP BY spec_name, spec_version, slice_name, slice_value, class"""


def _teacher_spend(j: dict[str, str]) -> str:
    """Per spec, model and UTC day. A cache hit saved what the paid call for the same
    request cost. The model is the answer's; a call with no stored answer (an error) is
    counted under the spec's primary teacher model."""
    return f"""
        WITH paid AS (
            SELECT request_hash, MAX(cost_usd) AS cost_usd
            FROM teacher_calls WHERE status = 'ok' GROUP BY request_hash
        ), calls AS (
            SELECT s.name AS spec_name, COALESCE(r.model, {j["spec_model"]}) AS model,
                   {j["day"]} AS day, c.status, c.prompt_tokens, c.completion_tokens,
                   c.cost_usd, p.cost_usd AS paid_usd
            FROM teacher_calls c
            JOIN specs s ON s.id = c.spec_id
            LEFT JOIN teacher_responses r ON r.request_hash = c.request_hash
            LEFT JOIN paid p ON p.request_hash = c.request_hash
        )
        SELECT spec_name, model, day,
               COUNT(*) AS calls,
               SUM(CASE WHEN status = 'ok' THEN 1 ELSE 0 END) AS ok,
               SUM(CASE WHEN status = 'error' THEN 1 ELSE 0 END) AS errors,
               SUM(CASE WHEN status = 'in_flight' THEN 1 ELSE 0 END) AS in_flight,
               SUM(CASE WHEN status = 'cache_hit' THEN 1 ELSE 0 END) AS cache_hits,
               SUM(prompt_tokens) AS prompt_tokens,
               SUM(completion_tokens) AS completion_tokens,
               SUM(cost_usd) AS cost_usd,
               SUM(CASE WHEN status = 'cache_hit' THEN COALESCE(paid_usd, 0) ELSE 0 END)
                   AS cache_saved_usd
        FROM calls
        GROUP BY spec_name, model, day"""


def view_sql(dialect: str) -> dict[str, str]:
    j = _json(dialect)
    return {
        "labeled_clean": _labeled(j, "", "l.verdict = 'accepted'"),
        "labeled_rejected": _labeled(
            j,
            ", l.verdict, l.reasons, l.problems, r.response AS raw_response",
            "l.verdict IN ('rejected', 'needs_review')",
        ),
        "label_stats": _label_stats(j),
        "teacher_spend": _teacher_spend(j),
    }


def grant_to_readers(views: Sequence[str]) -> None:
    """Views made again keep their readers: SELECT for the reader group, where it exists
    (``stillhouse db grant-reader`` makes it)."""
    if op.get_bind().dialect.name != "postgresql":
        return
    listed = ", ".join(views)
    op.execute(
        "DO $$ BEGIN IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'stillhouse_reader') "
        f"THEN GRANT SELECT ON {listed} TO stillhouse_reader; END IF; END $$"
    )


def upgrade() -> None:
    for name, sql in view_sql(op.get_bind().dialect.name).items():
        op.execute(f"CREATE VIEW {name} AS {sql}")
    grant_to_readers(VIEWS)


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
