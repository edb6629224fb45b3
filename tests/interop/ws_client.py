#!/usr/bin/env python3
"""kSync WebSocket interop client, written from docs/PROTOCOL.md only.

Usage: ws_client.py <ws-url> <api-key>

Prints one JSON object per line describing what it saw; the last line is {"ok": true}.
Exit codes: 0 ok, 2 protocol expectation failed, 3 the `websockets` package is missing.
"""

import asyncio
import json
import sys
import zlib

try:
    import websockets
except ImportError:  # pragma: no cover - the Rust test turns this into a clear failure
    print("python module 'websockets' is missing: run `python3 -m pip install websockets`",
          file=sys.stderr)
    sys.exit(3)


def report(**fields):
    print(json.dumps(fields), flush=True)


def expect(cond, what):
    if not cond:
        print("expectation failed: " + what, file=sys.stderr)
        sys.exit(2)


def decode(frame):
    # Text frames are JSON; binary frames are raw-DEFLATE'd JSON (compression negotiated).
    if isinstance(frame, bytes):
        return json.loads(zlib.decompressobj(-15).decompress(frame))
    return json.loads(frame)


async def recv(ws):
    return decode(await asyncio.wait_for(ws.recv(), timeout=5))


async def main(url, key):
    headers = {"X-Api-Key": key}
    # 1. Catch up from the beginning of the room: the Rust side published one event first.
    async with websockets.connect(url, additional_headers=headers) as reader, \
            websockets.connect(url, additional_headers=headers) as live:
        await reader.send(json.dumps({"type": "hello", "protocol": 1, "since": 0}))
        welcome = await recv(reader)
        expect(welcome["type"] == "welcome", "welcome first: %r" % welcome)
        report(step="welcome", room=welcome["room"], serverVersion=welcome["serverVersion"])
        history = []
        while len(history) < welcome["serverVersion"]:
            batch = await recv(reader)
            expect(batch["type"] == "events", "catch-up events: %r" % batch)
            history.extend(batch["events"])
        # The Rust event is 40 KB: the relay sent its batch as several frames (PROTOCOL).
        report(step="history", ids=[e["event"]["id"] for e in history],
               seqs=[e["seq"] for e in history],
               pads=[len(e["event"]["data"].get("pad", "")) for e in history])

        # 2. A second connection asks for compression and only the live stream.
        await live.send(json.dumps({"type": "hello", "protocol": 1, "compression": True}))
        live_welcome = await recv(live)
        expect(live_welcome["compression"] is True, "compression granted")

        # 3. Publish from Python; the ack carries our sequence number.
        # Over 1 KiB of JSON, so that the compressing connection gets it deflated (PROTOCOL:
        # shorter batches stay text frames).
        event = {"id": "from-python", "type": "interop", "data": {"lang": "python", "pad": "p" * 1200},
                 "timestamp": 1732615200000, "version": 1}
        await reader.send(json.dumps({"type": "publish", "ref": 1, "events": [event]}))
        ack = await recv(reader)
        expect(ack["type"] == "ack" and ack["ref"] == 1, "ack: %r" % ack)
        report(step="ack", results=ack["results"])

        # 4. The live connection receives it, deflated in a binary frame.
        raw = await asyncio.wait_for(live.recv(), timeout=5)
        got = decode(raw)
        expect(got["type"] == "events", "live events: %r" % got)
        report(step="live", binary=isinstance(raw, bytes),
               ids=[e["event"]["id"] for e in got["events"]],
               seqs=[e["seq"] for e in got["events"]])

        # 5. Unknown message types get a typed error and the connection stays usable.
        await reader.send(json.dumps({"type": "subscribe"}))
        err = await recv(reader)
        report(step="error", code=err.get("code"))
        await reader.send(json.dumps({"type": "publish", "ref": 2, "events": [event]}))
        dup = await recv(reader)
        report(step="duplicate", results=dup["results"])
    report(ok=True)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print(__doc__, file=sys.stderr)
        sys.exit(64)
    asyncio.run(main(sys.argv[1], sys.argv[2]))
