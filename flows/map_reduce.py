"""Map-reduce on scale-set workers: count words in generated documents, then merge the counts.

    python flows/map_reduce.py          # on the local cloud (after `localcloud start`)

The map tasks run in parallel on the workers; each reduce task takes the futures of two
earlier tasks as parameters, so the Prefect UI draws the reduction tree as dependency edges.
"""

from __future__ import annotations

import os
import random
from collections import Counter

from prefect import flow, task

from prefect_azmanagers import AzureScaleSetTaskRunner

TEMPLATE = os.environ.get("AZM_TEMPLATE", "localcloud-small")
MANIFEST = os.environ.get("AZM_MANIFEST", "localcloud")
WORDS = ["azure", "prefect", "julia", "python", "scale", "set", "task", "flow", "spot", "ssh"]


@task
def count_words(seed: int, length: int = 2_000) -> Counter:
    rng = random.Random(seed)
    return Counter(rng.choice(WORDS) for _ in range(length))


@task
def merge(left: Counter, right: Counter) -> Counter:
    return left + right


@flow(task_runner=AzureScaleSetTaskRunner(TEMPLATE, 2, manifest=MANIFEST, ppi=2))
def map_reduce(documents: int = 16) -> dict[str, int]:
    """Counts words of `documents` documents in parallel and merges the counts pairwise."""
    layer = list(count_words.map(range(documents)))
    while len(layer) > 1:
        merged = [merge.submit(a, b) for a, b in zip(layer[0::2], layer[1::2])]
        layer = merged + ([layer[-1]] if len(layer) % 2 else [])
    return dict(layer[0].result())


if __name__ == "__main__":
    counts = map_reduce()
    print(f"{sum(counts.values())} words:", ", ".join(f"{w}={c}" for w, c in sorted(counts.items())))
