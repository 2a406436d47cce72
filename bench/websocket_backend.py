#!/usr/bin/env python3
"""A WebSocket backend for the connection benchmark: accepts every WebSocket on 127.0.0.1:PORT
(any path) with the `websockets` library and keeps it open, silent (no pings), until the
client closes it.

    websocket_backend.py PORT
"""
import asyncio
import sys

import websockets


async def hold(socket, path=None):  # `path`: websockets 10 passes it, later versions do not
    await socket.wait_closed()


async def main():
    # No pings (they would count as traffic on idle connections); a backlog for 500 at once.
    async with websockets.serve(hold, "127.0.0.1", int(sys.argv[1]), ping_interval=None,
                                compression=None, backlog=4096):
        await asyncio.Future()


asyncio.run(main())
