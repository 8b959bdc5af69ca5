"""The README's main job: a flow on local-cloud scale-set workers, watched in the Prefect UI.

`bash scripts/demo` starts a Prefect server and the local cloud, then runs this file. It runs
the parameter sweep (2 instances x 2 workers, tasks shipped over SSH, states and logs reported
to the server through the SSH tunnel) and prints where to look in the UI.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

sys.path.insert(0, str(Path(__file__).resolve().parent))
from parameter_sweep import parameter_sweep  # noqa: E402  (a sibling example file)


def main() -> None:
    if not PREFECT_API_URL.value():
        sys.exit("Set PREFECT_API_URL to a running Prefect server (bash scripts/demo does).")
    state = parameter_sweep(return_state=True)
    (amplitude, frequency), error = state.result()
    ui = PREFECT_UI_URL.value() or PREFECT_API_URL.value().removesuffix("/api")
    flow_run_id = state.state_details.flow_run_id
    print(f"best fit: amplitude={amplitude} frequency={frequency} (mse {error:.4f})")
    print(f"Flow run in the Prefect UI: {ui}/runs/flow-run/{flow_run_id}")
    print("  (task runs and their dependency graph; the Logs tab has the workers' lines)")


if __name__ == "__main__":
    main()
