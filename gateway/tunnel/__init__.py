"""Tunnel mode: TCP streams between the sites over the qgw session (issue 9).

So far only :mod:`gateway.tunnel.messages` (the stream message codec, kinds 0x10-0x1F) exists;
the multiplexer state machine, the asyncio socket adapters and the runtime wiring are not built.
"""
