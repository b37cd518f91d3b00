#!/usr/bin/env python3
"""Extracts the ELF vmlinux from an x86 bzImage.

The setup header gives where the compressed payload sits (payload_offset at 0x248,
payload_length at 0x24c, relative to the protected-mode code that starts after
(setup_sects + 1) * 512 bytes). The payload's format is recognised by its magic and
decompressed with the matching tool; the result must be an ELF file.
"""
import struct
import subprocess
import sys

src, dst = sys.argv[1], sys.argv[2]
data = open(src, "rb").read()
if data[0x202:0x206] != b"HdrS":
    sys.exit(f"{src}: not a bzImage (no HdrS setup header)")
setup_sects = data[0x1F1] or 4
off, length = struct.unpack_from("<II", data, 0x248)
start = (setup_sects + 1) * 512 + off
payload = data[start : start + length]
tools = [
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
    (b"\xfd7zXZ", ["xz", "-dc"]),
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
]
for magic, cmd in tools:
    if payload.startswith(magic):
        # The kernel appends the decompressed size after the stream; decompressors may
        # complain about those trailing bytes, so judge by the output, not the exit code.
        out = subprocess.run(cmd, input=payload, capture_output=True).stdout
        break
else:
    sys.exit(f"{src}: unknown payload compression {payload[:4].hex()}")
if not out.startswith(b"\x7fELF"):
    sys.exit(f"{src}: payload did not decompress to an ELF file")
open(dst, "wb").write(out)
