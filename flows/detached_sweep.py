"""An example of a longer job for a detached VM: a small parameter sweep with progress output.

`prefect deployment run detached-sweep/sweep --param n=20 --watch` runs it on the VM of
prefect.yaml's work pool; the flow keeps running if the laptop that started it closes.
"""

from __future__ import annotations

import time

from prefect import flow, task


@task
def evaluate(x: int) -> float:
    time.sleep(0.1)
    return (x - 7) ** 2 / 10


@flow(name="detached-sweep", log_prints=True)
def sweep(n: int = 10) -> int:
    """Evaluates `n` points one after the other; returns the best one."""
    scores = {}
    for x in range(n):
        scores[x] = evaluate(x)
        print(f"x={x} score={scores[x]:.2f}")
    best = min(scores, key=scores.get)
    print(f"best x={best}")
    return best


if __name__ == "__main__":
    sweep()
