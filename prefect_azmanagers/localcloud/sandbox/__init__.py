"""VM sandboxes: what an instance of the local cloud is, from outside and from inside.

Two network modes (`network=`; by default isolated as root, loopback otherwise).

Isolated mode (root; CI and the development machine): each instance is a network namespace
with its own private IP on the local cloud's virtual network (netns.py), an OpenSSH sshd on
that IP (sshd.py) running in a mount namespace that gives it a VM's filesystem layout
(fsview.py), its customData run once by bash as root at boot (as cloud-init does) with output
in /var/log/cloud-init-output.log, and IMDS at http://169.254.169.254 (imds.py). Every process
started through SSH or by the boot script lives in the instance's namespaces, cannot reach the
host's 127.0.0.1, and is ended when the instance is killed or deleted. The Prefect API reaches
instances through one forwarded port on the network's gateway (tcpforward.py); admin accounts
are shared machine-wide with other local clouds (accounts.py); a running host holds its state
dir, so a second one cannot mistake its instances for leftovers.

Loopback mode (no root needed): each instance has its own address in 127.x.y.z (loopback.py)
on the host's network, an OpenSSH sshd run as the local cloud's own user on an unprivileged
port (`ssh_port`, the same for every instance), in a user + mount + UTS namespace giving the
same filesystem layout (the instance's /etc/passwd names that user adminUsername); its
customData runs once by bash as that user (there is no root on such an instance); IMDS listens
on the instance's address at `loopback_imds_port`. Instances share the host's network: they can
reach the driver's 127.0.0.1 and each other (the Prefect API still has its forwarder, on the
first address of the cloud's block: a port tunnelled over SSH to an instance's 127.0.0.1 would
collide with the driver's own).
Every SSH session, and the boot script, has the instance's IMDS URL in AZMANAGERS_IMDS_URL
(sshd.IMDS_URL_VARIABLE), in both modes. It needs unprivileged user namespaces.

A sandbox makes paths, network reachability and process lifetime match a VM's; it is not a
security boundary (the boot script is root on this machine, /usr and /etc are the host's).

```python
host = SandboxHost(state_dir, prefect_api_url="http://127.0.0.1:4200/api")
await host.start()
ip = host.allocate(vm_id)              # for the NIC, at once
await host.boot(InstanceSpec(key=vm_id, name="ss_0", computer_name="ss000000",
                             admin_username="azureuser", public_keys=[pubkey],
                             custom_data=b64script, metadata={"vmId": vm_id, ...}))
# ssh -i key azureuser@ip works now; the boot script may still be running
await host.stop()                      # nothing of it is left running or listening
```

Layout: host.py (SandboxHost: lifecycle, boot, faults, removal), modes.py (the isolated and
loopback network modes as strategies the host calls), common.py (errors, InstanceSpec, the
per-instance record).
"""

from prefect_azmanagers.localcloud.sandbox.common import InstanceSpec, SandboxBootError, SandboxError
from prefect_azmanagers.localcloud.sandbox.host import SandboxHost

__all__ = ["InstanceSpec", "SandboxBootError", "SandboxError", "SandboxHost"]
