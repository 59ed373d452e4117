"""The CloudWatch Embedded Metric Format, as the tests check it."""

from __future__ import annotations

import math
import re
from typing import Any

from deployments.observability import cloudwatch


def assert_emf(doc: dict[str, Any]) -> list[tuple[str, str, tuple[str, ...]]]:
    """Check one document against the EMF specification; return (namespace, metric,
    dimension set) for every metric it declares."""
    meta = doc["_aws"]
    assert isinstance(meta["Timestamp"], int) and meta["Timestamp"] > 1_600_000_000_000
    directives = meta["CloudWatchMetrics"]
    assert isinstance(directives, list) and directives
    declared = []
    for directive in directives:
        assert set(directive) == {"Namespace", "Dimensions", "Metrics"}
        assert re.fullmatch(r"[a-zA-Z0-9._#:/-]{1,255}", directive["Namespace"])
        assert isinstance(directive["Dimensions"], list)
        for dimension_set in directive["Dimensions"]:
            assert isinstance(dimension_set, list) and len(dimension_set) <= 30
            for name in dimension_set:
                value = doc[name]  # every dimension's value is at the root
                assert isinstance(value, str) and value and len(value) <= 1024
                assert value.isascii()
        assert 0 < len(directive["Metrics"]) <= 100
        for metric in directive["Metrics"]:
            assert set(metric) <= {"Name", "Unit", "StorageResolution"}
            assert metric["Unit"] in cloudwatch.UNITS
            value = doc[metric["Name"]]  # every metric's value is at the root
            if isinstance(value, dict):  # a histogram: Values/Counts, as AWS's exporter
                assert set(value) == {"Values", "Counts", "Max", "Min", "Count", "Sum"}
                assert len(value["Values"]) == len(value["Counts"]) <= 100
                assert value["Count"] == sum(value["Counts"])
                assert value["Min"] <= min(value["Values"]) <= max(value["Values"]) \
                    <= value["Max"]
            elif isinstance(value, list):
                assert 0 < len(value) <= 100
                assert all(isinstance(v, int | float) and math.isfinite(v) for v in value)
            else:
                assert isinstance(value, int | float) and math.isfinite(value)
            for dimension_set in directive["Dimensions"]:
                declared.append((directive["Namespace"], metric["Name"],
                                 tuple(dimension_set)))
    return declared
