"""`variablebundle`: values set on the driver that every detached job can read on its VM.

As AzManagers' `variablebundle!(; kw...)` / `variablebundle(:key)`: the driver calls
`variablebundle.update(session=...)`; the next detached job carries a copy of the mapping, and
inside the job `from prefect_azmanagers import variablebundle; variablebundle["session"]` reads
it (the same import works on both sides). Values must be picklable (cloudpickle). The bundle
travels in the job's flow-run parameters (or over SFTP for large payloads), so anyone who can
read the Prefect API can read it: keep credentials out of it.
"""

from __future__ import annotations

variablebundle: dict[str, object] = {}
