"""Run by test_e2e_faults (argv: manifest, template, scale set name): provision into a new
scale set and get Ctrl-C while the instances boot.

Prints "GROWING" once the create request was sent, then waits for the instances; the test
sends SIGINT and checks that the scale set (and every instance) is gone afterwards.
"""

import asyncio
import sys

from prefect_azmanagers.azure.bootscript import boot_script, encode_custom_data
from prefect_azmanagers.azure.clients import ArmClients
from prefect_azmanagers.azure.ownership import ownership_tags
from prefect_azmanagers.azure.scaleset import ScaleSet
from prefect_azmanagers.blocks import load_manifest, load_scaleset_template


async def main(manifest, template, name: str) -> None:
    data = encode_custom_data(boot_script(admin_username=manifest.ssh_user))
    async with ArmClients(manifest) as clients:
        async with ScaleSet(clients, manifest, template, name, custom_data=data,
                            tags=ownership_tags(name)) as scaleset:
            await scaleset.grow(3)
            print("GROWING", flush=True)
            await scaleset.wait_provisioned()
            print("PROVISIONED", flush=True)
            await asyncio.sleep(600)


if __name__ == "__main__":
    manifest_name, template_name, scaleset_name = sys.argv[1:4]
    asyncio.run(main(load_manifest(manifest_name), load_scaleset_template(template_name), scaleset_name))
