"""Tunnel mode: TCP streams between the sites over the qgw session (issue 9, docs/tunnel.md).

- :mod:`gateway.tunnel.messages`: the stream message codec (kinds 0x10-0x1F, TS1-TS7);
- :mod:`gateway.tunnel.mux`: the sans-I/O stream multiplexer (states, windows, TS8-TS14);
- :mod:`gateway.tunnel.sockets`: the asyncio adapters (local listeners and connectors).
"""
