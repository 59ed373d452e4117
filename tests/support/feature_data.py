"""A small demo data set: a feature store prepared from it takes seconds."""

from __future__ import annotations

from graph.demo.dataset import DatasetConfig

SMALL = DatasetConfig(n_symbols=5, n_accounts=8, n_days=5, n_train_rows=100)
SYMBOLS = [f"SYM{i:03d}" for i in range(SMALL.n_symbols)]
ACCOUNTS = [f"ACC{i:04d}" for i in range(SMALL.n_accounts)]
