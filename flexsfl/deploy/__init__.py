"""Deployment: putting a bundle and the edge runtime onto a device over SSH (``flexsfl flash``)."""
