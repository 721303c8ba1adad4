#!/usr/bin/env python3
"""Turns the strace logs capture.sh wrote into test vectors: one file per ipvsadm command,
one netlink message per line, '>' for what ipvsadm sent, '<' for what the kernel answered,
as hex of the whole message (nlmsghdr included, seq/pid as captured). MSG_PEEK reads are
skipped (libnl peeks before every read). Usage: extract.py TRACES_DIR OUT_DIR"""
import os
import re
import struct
import sys

traces, out = sys.argv[1], sys.argv[2]
os.makedirs(out, exist_ok=True)
commands = {}
for line in open(os.path.join(traces, "commands.txt")):
    m = re.match(r"== (\S+): (.*)", line.strip())
    if m:
        commands[m.group(1)] = m.group(2)
kernel = open(os.path.join(traces, "kernel.txt")).read().strip()
HEX = re.compile(r"^(?:\d+)?\s+\| [0-9a-f]{5}  ((?:[0-9a-f]{2} {1,2}){1,16})")
BUFFER = re.compile(r"^(?:\d+)?\s+\* \d+ bytes in buffer")

for name, command in sorted(commands.items()):
    lines = open(os.path.join(traces, name + ".strace")).read().splitlines()
    records = []  # (direction, bytes)
    current = None
    for line in lines:
        m = HEX.match(line)
        if m:
            if current is not None:
                current[1].extend(bytes.fromhex(m.group(1).replace(" ", "")))
            continue
        if BUFFER.match(line):
            continue
        if current is not None:
            records.append(current)
            current = None
        if re.search(r"\bsendmsg\(", line) and "= " in line:
            current = (">", bytearray())
        elif re.search(r"\brecvmsg\(", line) and "MSG_PEEK" not in line and "= " in line:
            current = ("<", bytearray())
    if current is not None:
        records.append(current)
    with open(os.path.join(out, name + ".txt"), "w") as f:
        f.write(f"# {command}\n# kernel {kernel}; captured with strace by capture.sh, split by extract.py\n")
        for direction, data in records:
            offset = 0
            while offset + 16 <= len(data):
                length = struct.unpack_from("<I", data, offset)[0]
                if length < 16 or offset + length > len(data):
                    raise SystemExit(f"{name}: bad nlmsg length {length} at {offset}")
                f.write(f"{direction} {data[offset:offset + length].hex()}\n")
                offset += (length + 3) & ~3
