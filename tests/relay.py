#!/usr/bin/env python3
"""A slow network for tests: an ssh ProxyCommand that relays to HOST PORT at BYTES_PER_SECOND each way.

It gives failure tests time to drop a connection in the middle of a transfer.
"""

import os
import socket
import sys
import threading
import time


def pump(read, write, rate: float) -> None:
    started, moved = time.monotonic(), 0
    try:
        while True:
            data = read(16384)
            if not data:
                break
            write(data)
            moved += len(data)
            ahead = moved / rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)
    except OSError:
        pass
    os._exit(0)


def main() -> None:
    host, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    sock = socket.create_connection((host, port))

    def to_stdout(data):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view) :]

    threading.Thread(target=pump, args=(lambda n: os.read(0, n), sock.sendall, rate), daemon=True).start()
    pump(sock.recv, to_stdout, rate)


if __name__ == "__main__":
    main()
