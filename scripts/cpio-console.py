#!/usr/bin/env python3
"""Writes to stdout a newc cpio archive holding only the character device dev/console (5, 1).

Creating the node with mknod needs root; an archive entry does not, and the kernel's initramfs
unpacker creates the node from it.
"""
import sys


def entry(name: bytes, mode: int, rdev: tuple) -> bytes:
    name += b"\0"
    # ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
    fields = [1, mode, 0, 0, 1, 0, 0, 0, 0, rdev[0], rdev[1], len(name), 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name
    return head + b"\0" * (-len(head) % 4)


archive = entry(b"dev/console", 0o020600, (5, 1)) + entry(b"TRAILER!!!", 0, (0, 0))
sys.stdout.buffer.write(archive + b"\0" * (-len(archive) % 512))
