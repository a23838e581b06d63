"""Hostile rows for `evotok serve --replicas` and its autoscaling flags: one line before Ray or a model loads."""

from __future__ import annotations

from tests.hostile import Case

SERVE = ["serve", "-m", "{model}", "--port", "0"]

CASES = [
    Case("serve-ray-zero-replicas", [*SERVE, "--replicas", "0"], "not a valid number of replicas"),
    Case("serve-ray-negative-replicas", [*SERVE, "--replicas", "-2"], "not a valid number of replicas"),
    Case("serve-ray-min-only", [*SERVE, "--min-replicas", "1"], "autoscaling needs both bounds"),
    Case("serve-ray-max-only", [*SERVE, "--replicas", "2", "--max-replicas", "3"], "autoscaling needs both bounds"),
    Case("serve-ray-min-above-max", [*SERVE, "--min-replicas", "3", "--max-replicas", "2"], "is above --max-replicas"),
    Case("serve-ray-start-outside", [*SERVE, "--replicas", "5", "--min-replicas", "1", "--max-replicas", "2"],
         "outside [1, 2]"),
    Case("serve-ray-target-zero", [*SERVE, "--min-replicas", "1", "--max-replicas", "2",
                                   "--target-ongoing-requests", "0"], "not a positive number of requests"),
]
