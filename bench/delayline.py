#!/usr/bin/env python3
"""A user-space delay line between two network namespaces (this kernel has no netem).

Creates one TUN device in each namespace (a point-to-point link ADDR_A <-> ADDR_B), and
forwards every IP packet read from one device to the other after a fixed one-way delay, in
order. TCP between the namespaces then sees the added round-trip time itself (slow start,
window growth, every request's latency), not a proxy that acknowledges early. The devices
are not persistent: they vanish when this process exits. Stop it with SIGTERM.

With --cap-bps RATE --cap-ports 80, each TCP connection's packets from a server port in that
list (ns-b to ns-a) leave at no more than RATE bytes per second, paced packet by packet with
no initial burst: a per-connection cap as object stores have. (nginx's limit_rate alone is not
one for ranged reads: it lets the first second's worth of every response through at once, so
8 MiB ranges are never slowed.) Other packets only see the delay.

  delayline.py --ns-a CLIENT_NS --ns-b SERVER_NS --addr-a 10.203.0.1 --addr-b 10.203.0.2 \\
               --delay-ms 10 [--cap-bps 52428800 --cap-ports 80] [--mtu 65000] [--ready FILE]

--delay-ms is one way, so the added round-trip time is twice it. A large MTU keeps the packet
rate (and this process's CPU) low. Prints `ready` (and writes FILE) once both ends are up;
on exit prints the packets and bytes it forwarded each way.
"""
import argparse
import ctypes
import fcntl
import heapq
import itertools
import os
import select
import signal
import struct
import subprocess
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN, IFF_NO_PI = 0x0001, 0x1000
CLONE_NEWNET = 0x40000000
libc = ctypes.CDLL(None, use_errno=True)


def setns(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def open_tun(ns, name):
    """A TUN device NAME created inside network namespace NS (opened from there)."""
    home = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        setns(f"/run/netns/{ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    finally:
        if libc.setns(home, CLONE_NEWNET) != 0:
            sys.exit("delayline.py: cannot return to the original network namespace")
        os.close(home)
    os.set_blocking(fd, False)
    return fd


def ip(*args):
    p = subprocess.run(["ip", *args], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"delayline.py: ip {' '.join(args)}: {p.stderr.strip()}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ns-a", required=True)
    ap.add_argument("--ns-b", required=True)
    ap.add_argument("--addr-a", required=True)
    ap.add_argument("--addr-b", required=True)
    ap.add_argument("--delay-ms", type=float, required=True, help="one-way delay")
    ap.add_argument("--cap-bps", type=float, default=0, help="per-connection cap, bytes per second (0: none)")
    ap.add_argument("--cap-ports", default="80", help="server ports whose connections are capped")
    ap.add_argument("--mtu", type=int, default=65000)
    ap.add_argument("--dev", default="ocbdelay")
    ap.add_argument("--ready", help="file to write once the link is up")
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0

    fds = {}
    for ns, local, peer in ((args.ns_a, args.addr_a, args.addr_b), (args.ns_b, args.addr_b, args.addr_a)):
        fds[ns] = open_tun(ns, args.dev)
        ip("-n", ns, "addr", "add", local, "peer", peer, "dev", args.dev)
        ip("-n", ns, "link", "set", args.dev, "mtu", str(args.mtu), "txqueuelen", "4000", "up")
    a, b = fds[args.ns_a], fds[args.ns_b]
    other = {a: b, b: a}
    heap, seq = [], itertools.count()        # (due, seq, destination fd, packet)
    counts = {a: [0, 0], b: [0, 0]}
    cap_ports = {int(p) for p in args.cap_ports.split(",") if p}
    flows = {}                                # capped connection -> time its last packet left the shaper
    paced = [0, 0]
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGINT, lambda *_: stop.append(1))
    print("ready", flush=True)
    if args.ready:
        with open(args.ready, "w") as f:
            f.write("ready\n")

    def capped_flow(pkt):
        """The connection key of a TCP/IPv4 packet from a capped server port, else None."""
        if len(pkt) < 40 or pkt[0] >> 4 != 4 or pkt[9] != 6:
            return None
        ihl = (pkt[0] & 15) * 4
        sport = (pkt[ihl] << 8) | pkt[ihl + 1]
        if sport not in cap_ports:
            return None
        return pkt[12:20] + pkt[ihl:ihl + 4]

    last_gc = time.monotonic()
    while not stop:
        now = time.monotonic()
        # Deliver everything that is due (per connection the due times only grow: order kept).
        while heap and heap[0][0] <= now:
            _, _, dst, pkt = heapq.heappop(heap)
            try:
                os.write(dst, pkt)
            except BlockingIOError:
                pass        # the receiving stack's queue is full: a drop, as a real link would
            src = other[dst]
            counts[src][0] += 1
            counts[src][1] += len(pkt)
        timeout = max(0.0, heap[0][0] - time.monotonic()) if heap else 0.5
        try:
            ready, _, _ = select.select([a, b], [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in ready:
            for _ in range(256):
                try:
                    pkt = os.read(fd, 65536 + 4096)
                except BlockingIOError:
                    break
                depart = now
                if fd == b and args.cap_bps:
                    key = capped_flow(pkt)
                    if key is not None:
                        depart = max(now, flows.get(key, 0.0)) + len(pkt) / args.cap_bps
                        flows[key] = depart
                        paced[0] += 1
                        paced[1] += len(pkt)
                heapq.heappush(heap, (depart + delay, next(seq), other[fd], pkt))
        if now - last_gc > 10:
            flows = {k: t for k, t in flows.items() if t > now - 10}
            last_gc = now
    print(f"forwarded {args.ns_a}->{args.ns_b}: {counts[a][0]} packets, {counts[a][1]} bytes; "
          f"{args.ns_b}->{args.ns_a}: {counts[b][0]} packets, {counts[b][1]} bytes "
          f"({paced[0]} packets, {paced[1]} bytes paced by the per-connection cap)", flush=True)


if __name__ == "__main__":
    main()
