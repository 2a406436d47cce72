#!/usr/bin/env python3
"""Holds many client connections open against one HTTP port, for the flood and connection benchmarks.

    hold_connections.py PORT COUNT MODE SECONDS

MODE idle:      each connection makes one keep-alive request, reads the answer, then idles.
MODE slowloris: each connection sends a request head one byte every 5 s, never finishing.
MODE websocket: each connection asks GET /ws (Host ws.example) to upgrade to a WebSocket,
                reads the 101, then idles (sends no frame).

Prints 'open N' once all connections are set up (or failed), holds them SECONDS from then
(setting up 10,000 can take longer than a measurement), prints 'still open N' (the ones the
server has not closed) and exits. Loopback only; bounded by COUNT, SECONDS and the timeouts.
"""
import asyncio
import sys

HEAD = b"GET / HTTP/1.1\r\nHost: bench.example\r\n\r\n"
UPGRADE = (b"GET /ws HTTP/1.1\r\nHost: ws.example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
TRICKLE = b"GET / HTTP/1.1\r\nHost: bench.example\r\nX-Slow: " + b"a" * 1000


async def connect(port):
    try:
        return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    except (OSError, asyncio.TimeoutError):
        return None


async def answered(port, request):
    """A new connection that sent `request` and read its answer's head: (reader, writer, head),
    or None (the connection closed) if any step failed or took over 10 s."""
    conn = await connect(port)
    if conn is None:
        return None
    reader, writer = conn
    try:
        writer.write(request)
        await writer.drain()
        return reader, writer, await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
        writer.close()
        return None


async def idle(port, hold):
    got = await answered(port, HEAD)
    if got is None:
        return None
    reader, writer, head = got
    try:
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n")
             if line.lower().startswith(b"content-length:")), 0)
        await asyncio.wait_for(reader.readexactly(length), 10)
    except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
        writer.close()
        return None
    hold.append((reader, writer))
    return writer


async def websocket(port, hold):
    got = await answered(port, UPGRADE)
    if got is None:
        return None
    reader, writer, head = got
    if not head.startswith(b"HTTP/1.1 101"):
        writer.close()
        return None
    hold.append((reader, writer))
    return writer


async def slowloris(port, hold):
    conn = await connect(port)
    if conn is None:
        return None
    hold.append(conn)
    return conn[1]


async def trickle(writer, until):
    loop = asyncio.get_running_loop()
    for byte in TRICKLE:
        if loop.time() >= until:
            return
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except OSError:
            return
        await asyncio.sleep(min(5, max(0, until - loop.time())))


async def main():
    port, count, mode, seconds = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    loop = asyncio.get_running_loop()
    hold = []
    opener = {"idle": idle, "slowloris": slowloris, "websocket": websocket}[mode]
    writers = []
    for start in range(0, count, 500):  # in batches, so the accept queue never overflows
        batch = await asyncio.gather(*(opener(port, hold) for _ in range(start, min(count, start + 500))))
        writers += [w for w in batch if w is not None]
    print(f"open {len(writers)}", flush=True)
    until = loop.time() + seconds
    tasks = []
    if mode == "slowloris":
        tasks = [asyncio.ensure_future(trickle(w, until)) for w in writers]
    # Let EOFs be noticed: a reader only sees one if something reads.
    readers = [asyncio.ensure_future(r.read(1 << 16)) for r, _ in hold]
    await asyncio.sleep(max(0, until - loop.time()))
    print(f"still open {sum(1 for r in readers if not r.done())}", flush=True)
    for t in tasks + readers:
        t.cancel()
    for _, w in hold:
        w.close()


asyncio.run(main())
