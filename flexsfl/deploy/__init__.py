"""Deployment: putting a bundle and the edge runtime onto a device over SSH (``flexsfl flash``).

:mod:`.flash` runs the steps; :mod:`.ssh` holds the connection, :mod:`.upload` plans and sends
files, :mod:`.wheel` builds the runtime wheel, :mod:`.service` renders the systemd unit,
:mod:`.checks` refuses an unfit device, and :mod:`.flash_remote` is the standard-library script
the device's python3 runs.
"""
