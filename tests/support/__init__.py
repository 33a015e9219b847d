"""Shared helpers for the end-to-end tests: real and fake upstreams, the
proxy as a subprocess, DNS clients (dnspython and dig) and a reply comparator.

Import from the submodules (`from support.dnsutil import udp`); the fixtures
built on them live in tests/conftest.py.
"""
