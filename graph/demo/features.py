"""Feast definitions of the demo features: two entities, two feature views, one service.

The names and columns are those of :mod:`graph.demo.dataset`, so a feature
store prepared from the generator serves exactly the rows the demo models were
trained on. :func:`feature_definitions` builds the objects over either source
kind the repository supports:

* ``file``     — parquet files (the embedded default, ``data/*.parquet`` under the repo);
* ``postgres`` — tables in PostgreSQL (the production configuration's offline store).

TTL: Feast 0.67 does not enforce a feature view's ``ttl`` on online reads (the
regular ``get_online_features`` path returns the latest materialised row, however
old; only pre-computed feature-service vectors are marked ``OUTSIDE_MAX_AGE``).
The TTL bounds point-in-time joins of historical retrieval and the window of
``materialize-incremental``. It is set to :data:`FEATURE_TTL` (a year) so a demo
prepared today keeps materialising and joining for months even if a later Feast
enforces TTL online; freshness is reported by the serving path instead (each
lookup returns every row's event time).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Literal, cast, get_args

from pydantic_settings import BaseSettings, SettingsConfigDict

from graph.demo.dataset import (
    ACCOUNT_KEY,
    MARKET_FEATURES,
    MARKET_VIEW,
    PORTFOLIO_FEATURES,
    PORTFOLIO_VIEW,
    SYMBOL_KEY,
)

if TYPE_CHECKING:  # Feast takes seconds to import: only where objects are built
    from feast import Entity, FeatureService, FeatureView
    from feast.data_source import DataSource
    from feast.feast_object import FeastObject

SourceKind = Literal["file", "postgres"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)

#: Event-time column and the ingestion-time column used to break ties between rows.
TIMESTAMP_FIELD = "event_timestamp"
CREATED_FIELD = "created"
#: See the module docstring: not enforced online by Feast 0.67.
FEATURE_TTL = timedelta(days=365)
#: The feature service listing the demo models' inputs, in model column order.
RISK_SERVICE = "risk_features"

#: Parquet paths of the file sources, relative to the feature repository (Feast
#: resolves relative paths against the repo, so the repo can move).
MARKET_PARQUET = f"data/{MARKET_VIEW}.parquet"
PORTFOLIO_PARQUET = f"data/{PORTFOLIO_VIEW}.parquet"
#: Default PostgreSQL table names; the environment may override them (see configs/feast).
MARKET_TABLE_ENV = "KEEL_FEAST_MARKET_TABLE"
PORTFOLIO_TABLE_ENV = "KEEL_FEAST_PORTFOLIO_TABLE"
SOURCE_KIND_ENV = "KEEL_FEAST_SOURCE"
DEFAULT_MARKET_TABLE = f"keel_{MARKET_VIEW}"
DEFAULT_PORTFOLIO_TABLE = f"keel_{PORTFOLIO_VIEW}"


@dataclass(frozen=True)
class SourceTables:
    """Where the two feature views read their rows: parquet paths or table names."""

    market: str
    portfolio: str


@dataclass(frozen=True)
class FeatureDefinitions:
    """The Feast objects of the demo, ready for ``FeatureStore.apply``."""

    symbol: Entity
    account_id: Entity
    market_features: FeatureView
    portfolio_features: FeatureView
    risk_features: FeatureService

    def objects(self) -> list[FeastObject]:
        """Everything, in an order ``apply`` accepts."""
        return [self.symbol, self.account_id, self.market_features, self.portfolio_features,
                self.risk_features]


class DemoSourceSettings(BaseSettings):
    """Where ``feast apply`` run by hand finds the demo's sources (``KEEL_FEAST_*``)."""

    model_config = SettingsConfigDict(env_prefix="KEEL_FEAST_", extra="ignore")

    #: ``file`` (parquet) or ``postgres``.
    source: str = ""
    market_table: str = ""
    portfolio_table: str = ""


def default_tables(kind: SourceKind) -> SourceTables:
    """The source locations of ``kind``: parquet paths, or table names (env overrides)."""
    if kind == "file":
        return SourceTables(MARKET_PARQUET, PORTFOLIO_PARQUET)
    settings = DemoSourceSettings()
    return SourceTables(settings.market_table or DEFAULT_MARKET_TABLE,
                        settings.portfolio_table or DEFAULT_PORTFOLIO_TABLE)


def source_kind_from_env() -> SourceKind:
    """``KEEL_FEAST_SOURCE`` (``file`` unless set), for ``feast apply`` run by hand."""
    kind = DemoSourceSettings().source or "file"
    if kind not in SOURCE_KINDS:
        raise ValueError(f"{SOURCE_KIND_ENV}={kind!r}: expected one of {list(SOURCE_KINDS)}")
    return cast(SourceKind, kind)


def feature_definitions(kind: SourceKind = "file",
                        tables: SourceTables | None = None) -> FeatureDefinitions:
    """Entities, views and service of the demo over sources of ``kind``.

    ``tables`` names the parquet paths (``file``) or PostgreSQL tables
    (``postgres``); :func:`default_tables` when omitted.
    """
    from feast import Entity, FeatureService, FeatureView, Field, ValueType
    from feast.types import Float32

    if kind not in SOURCE_KINDS:
        raise ValueError(f"source kind {kind!r}: expected one of {list(SOURCE_KINDS)}")
    where = tables or default_tables(kind)
    symbol = Entity(name=SYMBOL_KEY, join_keys=[SYMBOL_KEY], value_type=ValueType.STRING,
                    description="A traded instrument, e.g. SYM007.")
    account = Entity(name=ACCOUNT_KEY, join_keys=[ACCOUNT_KEY], value_type=ValueType.STRING,
                     description="A trading account, e.g. ACC0042.")
    market = FeatureView(
        name=MARKET_VIEW,
        entities=[symbol],
        ttl=FEATURE_TTL,
        schema=[Field(name=name, dtype=Float32) for name in MARKET_FEATURES],
        online=True,
        source=_source(kind, f"{MARKET_VIEW}_source", where.market),
        description="Daily market features of a symbol (returns, volatility, momentum, volume).",
    )
    portfolio = FeatureView(
        name=PORTFOLIO_VIEW,
        entities=[account],
        ttl=FEATURE_TTL,
        schema=[Field(name=name, dtype=Float32) for name in PORTFOLIO_FEATURES],
        online=True,
        source=_source(kind, f"{PORTFOLIO_VIEW}_source", where.portfolio),
        description="Daily portfolio features of an account (exposure, leverage, margin).",
    )
    service = FeatureService(
        name=RISK_SERVICE,
        features=[market, portfolio],
        description="Inputs of the demo risk models, market features first "
                    "(graph.demo.dataset.FEATURE_REFS order).",
    )
    return FeatureDefinitions(symbol=symbol, account_id=account, market_features=market,
                              portfolio_features=portfolio, risk_features=service)


def _source(kind: SourceKind, name: str, location: str) -> DataSource:
    from feast import FileSource
    from feast.infra.offline_stores.contrib.postgres_offline_store.postgres_source import (
        PostgreSQLSource,
    )

    if kind == "file":
        return FileSource(name=name, path=location, timestamp_field=TIMESTAMP_FIELD,
                          created_timestamp_column=CREATED_FIELD)
    return PostgreSQLSource(name=name, table=location, timestamp_field=TIMESTAMP_FIELD,
                            created_timestamp_column=CREATED_FIELD)


__all__ = [
    "FEATURE_TTL",
    "RISK_SERVICE",
    "FeatureDefinitions",
    "SourceKind",
    "SourceTables",
    "default_tables",
    "feature_definitions",
    "source_kind_from_env",
]
