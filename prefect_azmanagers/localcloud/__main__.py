"""`python -m prefect_azmanagers.localcloud`: run the local cloud in the foreground (server.main)."""

from prefect_azmanagers.localcloud.server import main

main()
