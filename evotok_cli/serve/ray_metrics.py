"""The /metrics of Ray Serve replicas as one Prometheus text: every replica pushes its app's text to one named
actor (`MetricsBoard`), and whichever replica answers /metrics merges the live ones (`merge_metrics`), each
sample labelled with its replica. Plain Python: ray wraps the board as an actor where it is deployed."""

from __future__ import annotations

import time

STALE_S = 10.0  # a replica silent for longer (killed) leaves /metrics


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several replicas as one: each family's HELP and TYPE once, then every replica's
    samples of it with a `replica` label."""
    families: dict[str, list[str]] = {}
    heads: dict[str, list[str]] = {}
    for replica, text in sorted(texts.items()):
        family = ""
        for line in text.splitlines():
            if not line.strip():
                continue
            if line.startswith("#"):
                parts = line.split(None, 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    head = heads.setdefault(family, [])
                    if line not in head:
                        head.append(line)
                    families.setdefault(family, [])
                continue
            families.setdefault(family, []).append(labelled(line, replica))
    out = []
    for family, samples in families.items():
        out += heads.get(family, []) + samples
    return "\n".join(out) + "\n"


def labelled(line: str, replica: str) -> str:
    """One sample line with `replica="..."` added to its labels."""
    name_labels, _, value = line.rpartition(" ")
    label = f'replica="{replica}"'
    if name_labels.endswith("}"):
        name, _, labels = name_labels[:-1].partition("{")
        return f"{name}{{{labels},{label}}} {value}" if labels else f"{name}{{{label}}} {value}"
    return f"{name_labels}{{{label}}} {value}"


class MetricsBoard:
    """A Ray actor: the latest metrics text of each replica, with when it arrived."""

    def __init__(self) -> None:
        self.texts: dict[str, tuple[float, str]] = {}

    def put(self, replica: str, text: str) -> None:
        self.texts[replica] = (time.time(), text)

    def drop(self, replica: str) -> None:
        self.texts.pop(replica, None)

    def all(self) -> dict[str, str]:
        now = time.time()
        return {r: text for r, (when, text) in self.texts.items() if now - when <= STALE_S}
