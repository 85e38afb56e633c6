"""The BOINC VM wrapper: runs the appliance (or plain host tasks) as a BOINC application.

Shipped to volunteers as one zipapp: standard library and ctypes only, and nothing here
imports from outside cvmbuild.boinc.
"""
