"""A deterministic synthetic market/portfolio data set for the demo risk models.

Two entity-keyed feature tables, as a Feast feature repository serves them:

* ``market`` — one row per (symbol, day): recent returns, realised volatility,
  momentum and an abnormal-volume score, from a simulated fat-tailed return
  process with per-symbol volatility regimes;
* ``portfolio`` — one row per (account, day): exposure, leverage, position
  concentration, recent drawdown and margin use of a simulated trading account.

and a ``training`` table of sampled (symbol, account, day) triples with both
feature sets joined and a binary ``label``: did the account have a risk event
(margin call / loss-limit breach) after trading that symbol. The label is a
Bernoulli draw from a logistic of feature *interactions* (leverage * volatility,
concentration * |5-day move|, a squared margin term, leverage against the
momentum sign, volume spikes, a drawdown term), so a small MLP beats a linear
model clearly without the problem becoming separable.

Units and ranges:

================== =============================================================
``ret_1d``          simple return over 1 trading day (fraction, ~±2 %)
``ret_5d``          simple return over the last 5 days
``ret_20d``         simple return over the last 20 days
``vol_20d``         annualised std of the last 20 daily log returns (> 0, about 0.1 to 1)
``momentum_60d``    simple return over the last 60 days
``volume_z``        abnormal volume z-score: unit variance, Student-t tails
``gross_exposure``  gross notional in USD millions (> 0)
``leverage``        gross notional / equity, in [0.5, 5]
``concentration``   Herfindahl index of position weights, in [1/num_positions, 1]
``drawdown_30d``    equity / its 30-day peak - 1: **non-positive**, in [-0.5, 0]
``margin_utilisation`` margin used / margin available, in (0, 1)
``num_positions``   number of open positions, an integer >= 1 (stored as float32)
================== =============================================================

Everything is drawn from one ``numpy.random.default_rng(seed)`` in a fixed
order, so the same :class:`DatasetConfig` always gives byte-identical frames.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

MARKET_VIEW = "market_features"
PORTFOLIO_VIEW = "portfolio_features"

MARKET_FEATURES: list[str] = ["ret_1d", "ret_5d", "ret_20d", "vol_20d", "momentum_60d", "volume_z"]
PORTFOLIO_FEATURES: list[str] = [
    "gross_exposure",
    "leverage",
    "concentration",
    "drawdown_30d",
    "margin_utilisation",
    "num_positions",
]
#: Model input column order: "view:feature", market features first.
FEATURE_REFS: list[str] = [f"{MARKET_VIEW}:{f}" for f in MARKET_FEATURES] + [
    f"{PORTFOLIO_VIEW}:{f}" for f in PORTFOLIO_FEATURES
]
#: Bare feature names in model input column order (the training table's columns).
FEATURE_NAMES: list[str] = MARKET_FEATURES + PORTFOLIO_FEATURES

SYMBOL_KEY = "symbol"
ACCOUNT_KEY = "account_id"
LABEL = "label"

#: Target share of positive labels in the training table.
BASE_RATE = 0.3
# Scale of the standardised risk score in logit units: sets how separable the
# classes are (the Bayes-optimal AUC is about 0.92; a linear model gets about 0.83).
_SIGNAL_SCALE = 4.0
_TRADING_DAYS = 252
# History simulated before the first published day, so 60-day windows are full.
_WARMUP = 60
_DRAWDOWN_WINDOW = 30


@dataclass(frozen=True)
class DatasetConfig:
    """Size and seed of the synthetic data set; equal configs give equal data."""

    seed: int = 7
    n_symbols: int = 50
    n_accounts: int = 200
    n_days: int = 30
    n_train_rows: int = 20_000
    end_date: date = date(2026, 11, 1)

    def __post_init__(self) -> None:
        for field in ("n_symbols", "n_accounts", "n_days", "n_train_rows"):
            if getattr(self, field) < 1:
                raise ValueError(f"DatasetConfig.{field} must be at least 1")
        combos = self.n_symbols * self.n_accounts * self.n_days
        if self.n_train_rows > combos:
            raise ValueError(
                f"n_train_rows={self.n_train_rows} exceeds the {combos} distinct "
                "(symbol, account, day) triples"
            )


@dataclass
class Dataset:
    """The generated frames; ``market`` and ``portfolio`` are Feast-ready sources."""

    config: DatasetConfig
    market: pd.DataFrame
    portfolio: pd.DataFrame
    training: pd.DataFrame


def generate(config: DatasetConfig = DatasetConfig()) -> Dataset:
    """Generate the market, portfolio and training frames for ``config``."""
    rng = np.random.default_rng(config.seed)
    timestamps = pd.date_range(end=pd.Timestamp(config.end_date), periods=config.n_days,
                               freq="D", tz="UTC")
    market_values, market_log_returns = _simulate_market(rng, config)
    portfolio_values = _simulate_portfolio(rng, config, market_log_returns)

    symbols = [f"SYM{i:03d}" for i in range(config.n_symbols)]
    accounts = [f"ACC{i:04d}" for i in range(config.n_accounts)]
    market = _entity_frame(SYMBOL_KEY, symbols, timestamps, market_values, MARKET_FEATURES)
    portfolio = _entity_frame(ACCOUNT_KEY, accounts, timestamps, portfolio_values,
                              PORTFOLIO_FEATURES)
    training = _sample_training(rng, config, symbols, accounts, timestamps,
                                market_values, portfolio_values)
    return Dataset(config=config, market=market, portfolio=portfolio, training=training)


def training_matrix(dataset: Dataset) -> tuple[np.ndarray[Any, np.dtype[np.float32]],
                                               np.ndarray[Any, np.dtype[np.int64]]]:
    """Features ``[n, 12]`` float32 in FEATURE_REFS order and labels ``[n]`` int64."""
    features = np.ascontiguousarray(dataset.training[FEATURE_NAMES].to_numpy(np.float32))
    labels = dataset.training[LABEL].to_numpy(np.int64)
    return features, labels


def _simulate_market(
    rng: np.random.Generator, config: DatasetConfig
) -> tuple[dict[str, np.ndarray[Any, Any]], np.ndarray[Any, Any]]:
    """Per-symbol daily features ``[n_symbols, n_days]`` and the full log-return history."""
    n_sym, n_hist = config.n_symbols, config.n_days + _WARMUP
    base_vol = np.exp(rng.normal(np.log(0.018), 0.35, size=(n_sym, 1)))
    drift = rng.normal(0.0002, 0.0008, size=(n_sym, 1))
    # Volatility regimes: an AR(1) in log-volatility, so calm and stressed
    # stretches alternate per symbol rather than every day being alike.
    log_vol_shock = np.zeros((n_sym, n_hist))
    innovations = rng.normal(0.0, 0.15, size=(n_sym, n_hist))
    for t in range(1, n_hist):
        log_vol_shock[:, t] = 0.92 * log_vol_shock[:, t - 1] + innovations[:, t]
    sigma = base_vol * np.exp(log_vol_shock)
    # Student-t (df=4) shocks scaled to unit variance: fat-tailed daily moves.
    shocks = rng.standard_t(4, size=(n_sym, n_hist)) / np.sqrt(2.0)
    log_ret = drift + sigma * shocks

    cum = np.concatenate([np.zeros((n_sym, 1)), np.cumsum(log_ret, axis=1)], axis=1)
    last = np.arange(_WARMUP, n_hist)  # history index of each published day

    def window_return(days: int) -> np.ndarray[Any, Any]:
        return np.asarray(np.expm1(cum[:, last + 1] - cum[:, last + 1 - days]))

    windows = sliding_window_view(log_ret, 20, axis=1)  # [n_sym, n_hist - 19, 20]
    vol_20d = windows[:, last - 19, :].std(axis=2, ddof=1) * np.sqrt(_TRADING_DAYS)
    # Abnormal volume follows the size of the day's move, plus its own fat-tailed noise.
    abs_shock = np.abs(shocks[:, last])
    volume_z = (0.5 * (abs_shock - abs_shock.mean()) / abs_shock.std()
                + np.sqrt(0.75) * rng.standard_t(4, size=abs_shock.shape) / np.sqrt(2.0))
    values = {
        "ret_1d": window_return(1),
        "ret_5d": window_return(5),
        "ret_20d": window_return(20),
        "vol_20d": vol_20d,
        "momentum_60d": window_return(60),
        "volume_z": volume_z,
    }
    return values, log_ret


def _simulate_portfolio(
    rng: np.random.Generator, config: DatasetConfig, market_log_ret: np.ndarray[Any, Any]
) -> dict[str, np.ndarray[Any, Any]]:
    """Per-account daily features ``[n_accounts, n_days]``."""
    n_acc, n_days = config.n_accounts, config.n_days
    n_hist = n_days + _WARMUP

    base_positions = 1 + rng.poisson(11, size=(n_acc, 1))
    num_positions = np.maximum(
        1, base_positions + np.round(rng.normal(0.0, 1.0, size=(n_acc, n_hist)))
    )

    base_leverage = np.exp(rng.normal(np.log(1.8), 0.45, size=(n_acc, 1)))
    lev_noise = _ar1(rng, 0.9, 0.06, (n_acc, n_hist))
    leverage = np.clip(base_leverage * np.exp(lev_noise), 0.5, 5.0)

    # Concentration as a share of the way from an equal-weight book (HHI = 1/k)
    # to a single position (HHI = 1).
    conc_logit = rng.normal(-1.3, 0.9, size=(n_acc, 1)) + _ar1(rng, 0.9, 0.15, (n_acc, n_hist))
    concentration = 1.0 / num_positions + (1.0 - 1.0 / num_positions) * _sigmoid(conc_logit)

    equity_musd = np.exp(rng.normal(np.log(2.0), 0.8, size=(n_acc, 1)))
    gross_exposure = equity_musd * leverage

    # Account returns: levered exposure to the market factor (the cross-symbol
    # mean return) plus idiosyncratic risk that grows with concentration.
    market_factor = market_log_ret.mean(axis=0, keepdims=True)
    beta = rng.normal(1.0, 0.3, size=(n_acc, 1))
    idio = rng.standard_t(5, size=(n_acc, n_hist)) / np.sqrt(5.0 / 3.0)
    acct_ret = leverage * (beta * market_factor + 0.012 * np.sqrt(concentration) * idio)
    equity_path = np.exp(np.cumsum(np.clip(acct_ret, -0.5, 0.5), axis=1))
    peaks = sliding_window_view(equity_path, _DRAWDOWN_WINDOW, axis=1).max(axis=2)
    last = np.arange(_WARMUP, n_hist)
    drawdown = np.clip(equity_path[:, last] / peaks[:, last - _DRAWDOWN_WINDOW + 1] - 1.0,
                       -0.5, 0.0)

    lev, conc = leverage[:, last], concentration[:, last]
    margin = _sigmoid(1.3 * (lev - 2.2) - 5.0 * drawdown + 1.5 * (conc - 0.3)
                      + rng.normal(0.0, 0.4, size=(n_acc, n_days)))
    return {
        "gross_exposure": gross_exposure[:, last],
        "leverage": lev,
        "concentration": conc,
        "drawdown_30d": drawdown,
        "margin_utilisation": margin,
        "num_positions": num_positions[:, last],
    }


def _sample_training(
    rng: np.random.Generator,
    config: DatasetConfig,
    symbols: list[str],
    accounts: list[str],
    timestamps: pd.DatetimeIndex,
    market: dict[str, np.ndarray[Any, Any]],
    portfolio: dict[str, np.ndarray[Any, Any]],
) -> pd.DataFrame:
    """Distinct (symbol, account, day) triples joined to both feature tables, labelled."""
    n_sym, n_acc, n_days = config.n_symbols, config.n_accounts, config.n_days
    flat = np.sort(rng.choice(n_sym * n_acc * n_days, size=config.n_train_rows, replace=False))
    day, rest = np.divmod(flat, n_sym * n_acc)
    sym, acc = np.divmod(rest, n_acc)

    # Round through float32 first: the label must be a function of exactly the
    # values a served model sees.
    feats = {name: market[name][sym, day].astype(np.float32) for name in MARKET_FEATURES}
    feats.update({name: portfolio[name][acc, day].astype(np.float32)
                  for name in PORTFOLIO_FEATURES})
    label = _draw_labels(rng, {k: v.astype(np.float64) for k, v in feats.items()})

    frame = pd.DataFrame({
        SYMBOL_KEY: np.asarray(symbols, dtype=object)[sym],
        ACCOUNT_KEY: np.asarray(accounts, dtype=object)[acc],
        "event_timestamp": timestamps[day],
    })
    for name in FEATURE_NAMES:
        frame[name] = feats[name]
    frame[LABEL] = label
    return frame


def _draw_labels(
    rng: np.random.Generator, f: dict[str, np.ndarray[Any, Any]]
) -> np.ndarray[Any, Any]:
    """Bernoulli labels from a logistic of feature interactions, at about BASE_RATE."""
    lev = f["leverage"]
    score = (
        2.0 * lev * f["vol_20d"]                                  # levered volatility
        + 12.0 * f["concentration"] * np.abs(f["ret_5d"])          # concentrated, big move
        + 3.0 * f["margin_utilisation"] ** 2                       # little margin headroom
        - 1.5 * np.sign(f["momentum_60d"]) * (lev - 2.0)           # levered against the trend
        + 0.6 * np.maximum(f["volume_z"] - 1.5, 0.0)               # disorderly trading
        - 4.0 * f["drawdown_30d"]                                  # already losing
        + 25.0 * np.abs(f["ret_1d"]) * (lev > 2.5)                 # large day, highly levered
    )
    z = _SIGNAL_SCALE * (score - score.mean()) / score.std()
    p = _sigmoid(z + _intercept_for_rate(z, BASE_RATE))
    return np.asarray(rng.random(z.shape) < p, dtype=np.int64)


def _intercept_for_rate(z: np.ndarray[Any, Any], rate: float) -> float:
    """The offset b with mean(sigmoid(z + b)) == rate, by bisection (monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(100):
        mid = (lo + hi) / 2.0
        if _sigmoid(z + mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2.0


def _entity_frame(
    key: str,
    entities: list[str],
    timestamps: pd.DatetimeIndex,
    values: dict[str, np.ndarray[Any, Any]],
    features: list[str],
) -> pd.DataFrame:
    """A long frame sorted by entity then timestamp, features as float32."""
    n_days = len(timestamps)
    frame = pd.DataFrame({
        key: np.repeat(np.asarray(entities, dtype=object), n_days),
        "event_timestamp": timestamps[np.tile(np.arange(n_days), len(entities))],
    })
    frame["created"] = frame["event_timestamp"]
    for name in features:
        frame[name] = values[name].reshape(-1).astype(np.float32)
    return frame


def _ar1(rng: np.random.Generator, phi: float, scale: float,
         shape: tuple[int, int]) -> np.ndarray[Any, Any]:
    """Stationary AR(1) paths along axis 1 with innovation std ``scale``."""
    noise = rng.normal(0.0, scale, size=shape)
    out = np.empty(shape)
    out[:, 0] = noise[:, 0] / np.sqrt(1.0 - phi * phi)
    for t in range(1, shape[1]):
        out[:, t] = phi * out[:, t - 1] + noise[:, t]
    return out


def _sigmoid(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.asarray(1.0 / (1.0 + np.exp(-x)))
