"""The demo's feature definitions, for the Feast CLI (``feast -c configs/feast apply``).

They live in :mod:`graph.demo.features` (importable and typed); Feast collects the
objects bound at module level here. ``KEEL_FEAST_SOURCE=postgres`` selects the
PostgreSQL sources of the production configuration (default: parquet files).
"""

from graph.demo.features import feature_definitions, source_kind_from_env

_definitions = feature_definitions(source_kind_from_env())

symbol = _definitions.symbol
account_id = _definitions.account_id
market_features = _definitions.market_features
portfolio_features = _definitions.portfolio_features
risk_features = _definitions.risk_features
