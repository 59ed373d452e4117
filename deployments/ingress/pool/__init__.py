"""The model pool: where each model runs, coalesced calls, Ray handles, hedging."""
