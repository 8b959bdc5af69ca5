"""An example flow for a detached VM: `prefect deployment run detached-hello/hello --watch`.

Deployed by prefect.yaml onto the work pool of a detached VM made with
`prefect-azmanagers detached add localcloud-vm --manifest localcloud --code flows`; its code reaches
the VM through `--code flows` (copied over SFTP into the pool's working directory).
"""

from __future__ import annotations

import platform

from prefect import flow, get_run_logger, task


@task
def shout(word: str) -> str:
    return word.upper()


@flow(name="detached-hello", log_prints=True)
def detached_hello(name: str = "world") -> str:
    """Greets from the VM: prints where it runs and returns the greeting."""
    greeting = f"hello {shout(name)} from {platform.node()}"
    print(greeting)
    get_run_logger().info("ran on the detached VM")
    return greeting


if __name__ == "__main__":
    detached_hello()
