"""A parameter sweep with dependencies: prepare data once, evaluate a grid of parameters on the
workers (each evaluation depends on the prepared data), then pick the best.

    python flows/parameter_sweep.py     # on the local cloud (after `localcloud start`)
"""

from __future__ import annotations

import itertools
import math
import os

from prefect import flow, task

from prefect_azmanagers import AzureScaleSetTaskRunner

TEMPLATE = os.environ.get("AZM_TEMPLATE", "localcloud-small")
MANIFEST = os.environ.get("AZM_MANIFEST", "localcloud")


@task
def prepare(points: int) -> list[tuple[float, float]]:
    """Noisy samples of y = 3 sin(2x) (the "measurements" the model is fitted to)."""
    return [(x / points * 6, 3 * math.sin(2 * x / points * 6) + 0.1 * math.cos(7 * x))
            for x in range(points)]


@task
def evaluate(data: list[tuple[float, float]], amplitude: float, frequency: float) -> float:
    """Mean squared error of y = amplitude * sin(frequency * x) on the data."""
    return sum((y - amplitude * math.sin(frequency * x)) ** 2 for x, y in data) / len(data)


@task
def best(scores: dict[tuple[float, float], float]) -> tuple[tuple[float, float], float]:
    params = min(scores, key=scores.get)
    return params, scores[params]


@flow(task_runner=AzureScaleSetTaskRunner(TEMPLATE, 2, manifest=MANIFEST, ppi=2))
def parameter_sweep(points: int = 400) -> tuple[tuple[float, float], float]:
    """Evaluates a 6 x 6 grid of (amplitude, frequency); returns the best pair and its error."""
    data = prepare.submit(points)
    grid = list(itertools.product([1, 2, 3, 4, 5, 6], [0.5, 1, 1.5, 2, 2.5, 3]))
    futures = {params: evaluate.submit(data, *params) for params in grid}
    return best.submit({params: f for params, f in futures.items()}).result()


if __name__ == "__main__":
    (amplitude, frequency), error = parameter_sweep()
    print(f"best fit: amplitude={amplitude} frequency={frequency} (mse {error:.4f})")
