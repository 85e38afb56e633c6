"""The BOINC VM wrapper: runs the thin appliance (or host programs) as a BOINC task.

Shipped to volunteers as one zipapp: standard library and ctypes only, and nothing
outside this package is imported (docs/BOINC.md).
"""
