"""The demo market-risk models: a synthetic data set and the builder of their repository.

``dataset`` generates deterministic symbol-level market features, account-level
portfolio features and a labelled training table; ``build`` trains an MLP and a
gradient-boosted tree on it, exports both to ONNX, quantises the MLP to INT8
and writes ``<root>/<name>/<version>/model.onnx`` + ``model.yaml`` for each.
Only ``build`` needs the ``train`` extra (scikit-learn, skl2onnx).
"""

from collections.abc import Callable

#: Told each step of a long build as it starts (``keel prepare`` prints them).
Step = Callable[[str], None]


def quiet(_: str) -> None:
    """A :data:`Step` that says nothing."""
