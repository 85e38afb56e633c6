"""The Co-Pilot manager: a job queue in Redis that appliances' agents pull from over HTTP
(protocol v1, docs/COPILOT.md)."""
