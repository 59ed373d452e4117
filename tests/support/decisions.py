"""Entities for /v1/decide and the scores the demo models must give them."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from graph.demo.dataset import (
    ACCOUNT_KEY,
    MARKET_FEATURES,
    PORTFOLIO_FEATURES,
    SYMBOL_KEY,
    DatasetConfig,
    generate,
)


@cache
def latest_features() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Each symbol's and account's newest feature row, straight from the generator."""
    data = generate(DatasetConfig(n_train_rows=4000))
    market = data.market.sort_values("event_timestamp").groupby(SYMBOL_KEY).last()
    portfolio = data.portfolio.sort_values("event_timestamp").groupby(ACCOUNT_KEY).last()
    return ({k: market.loc[k, MARKET_FEATURES].to_numpy(np.float32) for k in market.index},
            {k: portfolio.loc[k, PORTFOLIO_FEATURES].to_numpy(np.float32)
             for k in portfolio.index})


def expected_scores(model_repo: Path, model: str, entities: list[dict[str, str]],
                    version: str = "1") -> np.ndarray:
    """P(risk event) as the model file computes it, one row at a time."""
    market, portfolio = latest_features()
    x = np.stack([np.concatenate([market[e[SYMBOL_KEY]], portfolio[e[ACCOUNT_KEY]]])
                  for e in entities])
    session = ort.InferenceSession(str(model_repo / model / version / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    return np.array([session.run(["probabilities"], {"features": x[i:i + 1]})[0][0, 1]
                     for i in range(len(x))])


def entities(n: int, offset: int = 0) -> list[dict[str, str]]:
    return [{SYMBOL_KEY: f"SYM{(offset + i) % 50:03d}",
             ACCOUNT_KEY: f"ACC{(offset * 7 + 3 * i) % 200:04d}"} for i in range(n)]
