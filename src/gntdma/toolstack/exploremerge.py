"""Shards of a campaign and their merge (``--shard I/N``, ``--merge``).

Shard ``I`` of ``N`` runs the ``I``-th contiguous slice of the schedules (for a
Slurm job array, GNU parallel or any launcher) and writes a result file: the
campaign it belongs to, and every schedule it ran in order with how it ended
(up to its first failure). A shard of a PCT campaign cannot know the ``k``
earlier slices would have taught the sequential explorer; it learns from its
own slice and records the ``k`` of each schedule, and the merge keeps only the
schedules whose ``k`` was right, running the others again (PCT's k only grows
and soon stops growing, so these are few). The merged campaign is then exactly
the unsharded one: the same first failure, the same replay file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gntdma.errors import ConfigError
from gntdma.toolstack.explorejobs import CampaignSpec, ScheduleResult
from gntdma.toolstack.explorepool import Campaign

__all__ = [
    "RESULTS_FORMAT",
    "ShardFile",
    "parse_shard",
    "read_results",
    "shard_indices",
    "write_results",
]

RESULTS_FORMAT = "gntdma-explore-results-1"


def parse_shard(text: str) -> tuple[int, int]:
    """``I/N`` with 1 <= I <= N."""
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ConfigError(f"--shard must be I/N (e.g. 2/8), not {text!r}") from None
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text}: I must be from 1 to N")
    return i, n


def shard_indices(budget: int, i: int, n: int) -> range:
    """The schedules of shard ``i`` of ``n`` (contiguous, sizes differing by at most 1)."""
    return range((i - 1) * budget // n, i * budget // n)


def write_results(path: Path, campaign: Campaign, shard: tuple[int, int],
                  seconds: float) -> None:
    ran = list(campaign.accepted)
    doc: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "campaign": campaign.spec.to_json(),
        "shard": list(shard),
        "seconds": seconds,
        "results": [r.to_json() for r in ran],
    }
    path.write_text(json.dumps(doc) + "\n")


class ShardFile:
    """One shard's result file, read and checked."""

    def __init__(self, path: Path, spec: CampaignSpec, shard: tuple[int, int],
                 seconds: float, results: list[ScheduleResult]) -> None:
        self.path = path
        self.spec = spec
        self.shard = shard
        self.seconds = seconds
        self.results = results


def read_results(path: Path) -> ShardFile:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot read a result file: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"{path}: not a gntdma explore result file (not JSON: {e})"
                          ) from None
    if not isinstance(doc, dict) or doc.get("format") != RESULTS_FORMAT:
        raise ConfigError(f"{path}: not a gntdma explore result file")
    try:
        spec = CampaignSpec.from_json(doc["campaign"])
        i, n = (int(x) for x in doc["shard"])
        results = [ScheduleResult.from_json(r) for r in doc["results"]]
        seconds = float(doc["seconds"])
    except KeyError as e:
        raise ConfigError(f"{path}: malformed result file: missing {e}") from None
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: malformed result file: {e}") from None
    return ShardFile(path, spec, (i, n), seconds, results)


def merge_campaign(files: list[ShardFile]) -> tuple[Campaign, float]:
    """One campaign fed with every shard's results; the shards' seconds summed.

    The files must be the N shards of one campaign, each once.
    """
    if not files:
        raise ConfigError("--merge needs the result files of the shards")
    first = files[0]
    n = first.shard[1]
    seen: dict[int, Path] = {}
    for f in files:
        if f.spec.to_json() != first.spec.to_json():
            raise ConfigError(f"{f.path}: a shard of another campaign than {first.path} "
                              f"({f.spec.to_json()} vs {first.spec.to_json()})")
        if f.shard[1] != n:
            raise ConfigError(f"{f.path}: shard {f.shard[0]}/{f.shard[1]}, but {first.path} "
                              f"is one of {n}")
        if f.shard[0] in seen:
            raise ConfigError(f"{f.path}: shard {f.shard[0]}/{n} given twice (also "
                              f"{seen[f.shard[0]]})")
        seen[f.shard[0]] = f.path
    missing = [str(i) for i in range(1, n + 1) if i not in seen]
    if missing:
        raise ConfigError(f"--merge: shard(s) {', '.join(missing)} of {n} missing")
    campaign = Campaign(first.spec)
    for f in files:
        for r in f.results:
            campaign.offer(r)
    campaign.advance()
    return campaign, sum(f.seconds for f in files)
