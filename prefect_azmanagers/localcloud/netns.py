"""The local cloud's virtual network: one network namespace per instance, as on Azure.

Layout (everything named after the local cloud's id, so several local clouds coexist and a
crashed one's leftovers are found again):

    host ── veth `azl<id>` (gateway, e.g. 10.213.4.1/22)
              │
    netns `azlc-<id>-vnet`: bridge br0 ── `i<n>` veth ──┐
                                                        │
    netns `azlc-<id>-<n>`: eth0 10.213.4.<n>/22, lo + 169.254.169.254 (IMDS)

The host reaches every instance through its one veth end; instances reach each other and the
gateway address (where the Prefect API forwarder listens), but not the host's 127.0.0.1 nor
anything else (no default route, no forwarding). Nothing else on the host changes: the
metadata address only exists on each instance's own loopback.
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

from prefect_azmanagers.localcloud._proc import CommandError, end_namespace_processes, run

NETNS_DIR = Path("/run/netns")
IMDS_ADDRESS = "169.254.169.254"
SUBNET_PREFIX = 22  # each local cloud takes one /22 (1021 instances) of the address block


class VirtualNetwork:
    """Namespaces, links and addresses of one local cloud, identified by `cloud_id`."""

    def __init__(self, cloud_id: str, subnet: ipaddress.IPv4Network):
        self.cloud_id = cloud_id
        self.subnet = subnet
        self.gateway = str(subnet.network_address + 1)
        self.host_link = f"azl{cloud_id}"
        self.vnet_ns = f"azlc-{cloud_id}-vnet"

    def instance_ns(self, index: int) -> str:
        return f"azlc-{self.cloud_id}-{index}"

    def address(self, index: int) -> str:
        return str(self.subnet.network_address + index)

    @property
    def instance_indexes(self) -> range:
        """Host numbers instances may use (the first is the gateway, the last is broadcast)."""
        return range(2, self.subnet.num_addresses - 1)

    async def create(self) -> None:
        await run("ip", "netns", "add", self.vnet_ns)
        await run("ip", "-n", self.vnet_ns, "link", "add", "br0", "type", "bridge")
        await run("ip", "-n", self.vnet_ns, "link", "set", "br0", "up")
        await run("ip", "link", "add", self.host_link, "type", "veth", "peer", "name", "uplink",
                  "netns", self.vnet_ns)
        await run("ip", "-n", self.vnet_ns, "link", "set", "dev", "uplink", "master", "br0", "up")
        await run("ip", "addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.host_link)
        await run("ip", "link", "set", self.host_link, "up")

    async def add_instance(self, index: int) -> Path:
        """Create the instance's namespace wired to the bridge; returns its netns file."""
        ns, port = self.instance_ns(index), f"i{index}"
        await run("ip", "netns", "add", ns)
        await run("ip", "-n", self.vnet_ns, "link", "del", port, check=False)  # a stale twin
        await run("ip", "-n", self.vnet_ns, "link", "add", port, "type", "veth", "peer", "name",
                  "eth0", "netns", ns)
        await run("ip", "-n", self.vnet_ns, "link", "set", "dev", port, "master", "br0", "up")
        await run("ip", "-n", ns, "addr", "add", f"{self.address(index)}/{self.subnet.prefixlen}",
                  "dev", "eth0")
        await run("ip", "-n", ns, "link", "set", "eth0", "up")
        await run("ip", "-n", ns, "link", "set", "lo", "up")
        await run("ip", "-n", ns, "addr", "add", f"{IMDS_ADDRESS}/32", "dev", "lo")
        await self._forget_neighbor(index)
        return NETNS_DIR / ns

    async def _forget_neighbor(self, index: int) -> None:
        """Drop the host's ARP entry for a reused address: it would name the previous
        instance's MAC and blackhole connections until it expires (~30 s)."""
        await run("ip", "neigh", "flush", "to", self.address(index), "dev", self.host_link, check=False)

    async def remove_instance(self, index: int, grace: float) -> None:
        """End the namespace's processes (SIGTERM, then SIGKILL after `grace`), remove its link
        and the namespace. Idempotent."""
        await remove_namespace(self.instance_ns(index), grace)
        await run("ip", "-n", self.vnet_ns, "link", "del", f"i{index}", check=False)
        await self._forget_neighbor(index)

    async def destroy(self) -> None:
        """Remove the host link and the bridge namespace (instances first). Idempotent."""
        await run("ip", "link", "del", self.host_link, check=False)
        await remove_namespace(self.vnet_ns, grace=0)


async def remove_namespace(name: str, grace: float) -> None:
    netns_file = NETNS_DIR / name
    if not netns_file.exists():
        return
    await end_namespace_processes(netns_file, grace)
    try:
        await run("ip", "netns", "del", name)
    except CommandError:
        if netns_file.exists():
            raise


async def remove_leftovers(cloud_id: str) -> list[str]:
    """Remove every namespace and link of an earlier run of this local cloud; returns their names."""
    prefix = f"azlc-{cloud_id}-"
    names = sorted(p.name for p in NETNS_DIR.glob(prefix + "*")) if NETNS_DIR.is_dir() else []
    vnet = prefix + "vnet"
    for name in names:
        if name != vnet:
            await remove_namespace(name, grace=0)
    removed = list(names)
    if await link_exists(f"azl{cloud_id}"):
        await run("ip", "link", "del", f"azl{cloud_id}")
        removed.append(f"azl{cloud_id}")
    await remove_namespace(vnet, grace=0)
    return removed


def is_running(cloud_id: str) -> bool:
    """Whether the local cloud `cloud_id` has its network (it exists from start to stop)."""
    return (NETNS_DIR / f"azlc-{cloud_id}-vnet").exists()


async def link_exists(name: str) -> bool:
    return bool((await run("ip", "-o", "link", "show", "dev", name, check=False)).strip())


async def choose_subnet(block: ipaddress.IPv4Network, preferred: ipaddress.IPv4Network | None
                        ) -> ipaddress.IPv4Network:
    """A /22 of `block` that no address or route on the host overlaps (another local cloud may
    be running); `preferred` (this cloud's earlier one) first. Call under the host lock."""
    taken = [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False)
             for link in json.loads(await run("ip", "-j", "-4", "addr", "show"))
             for a in link.get("addr_info", [])]
    for route in json.loads(await run("ip", "-j", "-4", "route", "show")):
        if route.get("dst", "default") != "default":
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
    prefix = max(SUBNET_PREFIX, block.prefixlen)
    candidates = list(block.subnets(new_prefix=prefix))
    if preferred in candidates:
        candidates.insert(0, preferred)
    for subnet in candidates:
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError(
        f"no free /{prefix} left in the local cloud's address block {block}: every one is used "
        "by another local cloud or a host route; stop one or pass another address_block"
    )
