"""The entity registry: every kind of CRM record, declared once.

Each entity names its staging table (`stg.mapped_<name>`), its target table and key, the columns
a source YAML may map (with their PostgreSQL types), its money columns with their scale and the
sums reconciliation compares. Map, validate, load, reconcile, orphan handling, merges and splits,
the staging purge, status and the run figures all iterate over `ENTITIES` / `FACTS`, so a new
entity is one entry here plus its tables in a migration (`tests/test_entities.py` checks that the
tables match this registry, and that a merge moves a row of every entity).

Guarantees: a fact (every entity but `customer`) hangs off a golden customer through
`customer_id`, found from `source_customer_id` as the stream's `customer_ref` says; money columns
are `numeric(18, scale)`; `row_hash`, `loaded_run_id` and the soft-delete columns `deleted_at`,
`deleted_run_id` are on every target row.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class EntitySpec:
    name: str
    target: str                      # crm table holding the latest version of each source record
    key: str                         # its column holding the source record id
    columns: dict[str, str]          # mapped column -> PostgreSQL type (staging and target alike)
    money: dict[str, int] = field(default_factory=dict)   # money column -> scale
    sums: tuple[str, ...] = ()       # columns whose exact sums reconciliation compares
    defaults: dict[str, str] = field(default_factory=dict)  # column -> SQL default applied at load

    @property
    def staging(self) -> str:
        return f"stg.mapped_{self.name}"

    @property
    def mappable(self) -> tuple[str, ...]:
        """The target fields a source YAML may map."""
        return tuple(self.columns)


_TS = "timestamptz"
_MONEY = "numeric(18,2)"

CUSTOMER = EntitySpec(
    "customer", "crm.source_customer", "source_id",
    # identity columns (customer_id, names, phones, e-mail) come from the resolve stage
    {"full_name": "text", "company": "text", "city": "text", "source_created_at": _TS, "source_updated_at": _TS},
)

FACTS: tuple[EntitySpec, ...] = (
    EntitySpec("order", "crm.sales_order", "order_id", {
        "source_customer_id": "text", "order_date": "date", "amount": _MONEY, "currency": "text", "status": "text",
        "source_updated_at": _TS,
    }, money={"amount": 2}, sums=("amount",), defaults={"currency": "'CNY'"}),
    EntitySpec("ticket", "crm.ticket", "ticket_id", {
        "source_customer_id": "text", "subject": "text", "status": "text", "priority": "text",
        "source_created_at": _TS, "source_updated_at": _TS,
    }),
    EntitySpec("interaction", "crm.interaction", "interaction_id", {
        "source_customer_id": "text", "channel": "text", "kind": "text", "direction": "text", "started_at": _TS,
        "ended_at": _TS, "duration_seconds": "integer", "message_count": "integer", "summary": "text",
        "tags": "jsonb", "agent": "text", "queue": "text", "recording_url": "text", "status": "text",
        "source_updated_at": _TS,
    }),
    EntitySpec("invoice", "crm.invoice", "invoice_id", {
        "source_customer_id": "text", "issued_on": "date", "amount": _MONEY, "tax_amount": _MONEY,
        "total_amount": _MONEY, "currency": "text", "status": "text", "source_updated_at": _TS,
    }, money={"amount": 2, "tax_amount": 2, "total_amount": 2}, sums=("amount", "tax_amount", "total_amount"),
        defaults={"currency": "'CNY'"}),
    EntitySpec("payment", "crm.payment", "payment_id", {
        "source_customer_id": "text", "invoice_ref": "text", "paid_on": "date", "amount": _MONEY,
        "currency": "text", "method": "text", "source_updated_at": _TS,
    }, money={"amount": 2}, sums=("amount",), defaults={"currency": "'CNY'"}),
    EntitySpec("contract", "crm.contract", "contract_id", {
        "source_customer_id": "text", "title": "text", "signed_on": "date", "starts_on": "date", "ends_on": "date",
        "amount": _MONEY, "currency": "text", "status": "text", "source_updated_at": _TS,
    }, money={"amount": 2}, sums=("amount",), defaults={"currency": "'CNY'"}),
)

ENTITIES: tuple[EntitySpec, ...] = (CUSTOMER, *FACTS)
_BY_NAME = {e.name: e for e in ENTITIES}

# Every crm table whose rows belong to a customer through `customer_id`: a merge moves them all.
CUSTOMER_OWNED: tuple[str, ...] = ("crm.customer_link", "crm.source_customer", *(f.target for f in FACTS))


def get(name: str) -> EntitySpec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown entity {name!r}; known: {sorted(_BY_NAME)}") from None


def staging_tables() -> tuple[str, ...]:
    return tuple(e.staging for e in ENTITIES)
