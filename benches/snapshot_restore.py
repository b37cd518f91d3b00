#!/usr/bin/env python3
"""Snapshot and restore cost of the VMM itself, natively, with a micro guest that answers each
console byte with the next letter (the guest of tests/snapshot_native.rs). For a 256 MiB and a
2 GiB guest: the time PUT /snapshot/create takes and the files' sizes; then, RUNS times, a fresh
pvm process loads the snapshot with resume_vm true: the load request's round trip, the time
from the request to the guest's first answer, and pvm's own restore time (its log line
"snapshot ... restored in N us": reading and checking the file, mapping the memory file,
building devices and vCPUs and setting their state).

Firecracker runs the same guest through the same requests when its binary is there
($PVM_FIRECRACKER, else ~/.cache/pvm/firecracker; see ../shared/docs/firecracker.md), restores
alternating with pvm's; its own restore time is its `load_snapshot` metric.

Usage: benches/snapshot_restore.py [RUNS] [PVM]   (builds target/release/pvm unless PVM is given)
"""
import os
import re
import select
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 9
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if len(sys.argv) > 2:
    pvm = sys.argv[2]
else:
    subprocess.run(["cargo", "build", "--release", "-q", "--bin", "pvm"], cwd=root, check=True)
    pvm = os.path.join(root, "target/release/pvm")

# mov bl,'a'; loop: wait for UART data; read it; out bl; inc bl; jmp loop
code = bytes([0xB3, 0x61, 0x66, 0xBA, 0xFD, 0x03, 0xEC, 0xA8, 0x01, 0x74, 0xFB, 0x66, 0xBA,
              0xF8, 0x03, 0xEC, 0x88, 0xD8, 0xEE, 0xFE, 0xC3, 0xEB, 0xEB])
load = 0x100000
ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
    "<HHIQQQIHHHHHH", 2, 0x3E, 1, load, 64, 0, 0, 64, 56, 1, 0, 0, 0)
phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, load, load, len(code), len(code), 0x1000)
work = tempfile.mkdtemp(prefix="pvm-snapbench-")
kernel = os.path.join(work, "counter.elf")
with open(kernel, "wb") as f:
    f.write((ehdr + phdr).ljust(0x1000, b"\0") + code)


def call(sock, method, path, body=None):
    """One request; returns (status line, seconds)."""
    s = socket.socket(socket.AF_UNIX)
    for _ in range(1000):
        try:
            s.connect(sock)
            break
        except OSError:
            time.sleep(0.002)
    req = f"{method} {path} HTTP/1.1\r\nHost: x\r\n"
    if body:
        req += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    req += "\r\n" + (body or "")
    start = time.perf_counter()
    s.sendall(req.encode())
    answer = s.recv(4096).decode(errors="replace")
    took = time.perf_counter() - start
    s.close()
    return answer.split("\r\n")[0], took


firecracker = os.environ.get("PVM_FIRECRACKER",
                             os.path.expanduser("~/.cache/pvm/firecracker"))
vmms = ["pvm"] + (["firecracker"] if os.access(firecracker, os.X_OK) else [])
if len(vmms) == 1:
    print(f"Firecracker comparison left out: no executable {firecracker}")


def start(vmm, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    if vmm == "pvm":
        argv = [pvm, "--api-sock", sock, "--log-level", "info"]
    else:
        for suffix in (".metrics", ".log"):
            open(sock + suffix, "w").close()
        # Its log to a file: on stdout it would mix with the guest's console.
        argv = [firecracker, "--api-sock", sock, "--no-seccomp", "--metrics-path",
                sock + ".metrics", "--log-path", sock + ".log"]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def own_restore_ms(vmm, sock, err):
    """The VMM's own account of the load: pvm's log line, Firecracker's load_snapshot metric."""
    if vmm == "pvm":
        for line in err.decode().splitlines():
            if "restored in" in line:
                return int(line.split("restored in")[1].split()[0]) / 1000
        return None
    with open(sock + ".metrics") as f:
        found = re.findall(r'"load_snapshot":(\d+)', f.read())
    return int(found[-1]) / 1000 if found else None


def pvm_restore_cpu_ms(err):
    """The CPU time pvm's log line gives for its restore ("..., N us of CPU")."""
    found = re.findall(r"restored in \d+ us, (\d+) us of CPU", err.decode())
    return int(found[-1]) / 1000 if found else None


def ask(proc):
    proc.stdin.write(b"x")
    proc.stdin.flush()
    ready, _, _ = select.select([proc.stdout], [], [], 10)
    return os.read(proc.stdout.fileno(), 1) if ready else None


def flush_metrics(vmm, sock):
    if vmm == "firecracker":
        call(sock, "PUT", "/actions", '{"action_type": "FlushMetrics"}')


med = statistics.median
for mib in (256, 2048):
    body = {}
    for vmm in vmms:
        snap = os.path.join(work, f"{vmm}-{mib}.snap")
        mem = os.path.join(work, f"{vmm}-{mib}.mem")
        sock = os.path.join(work, f"{vmm}-boot.sock")
        proc = start(vmm, sock)
        call(sock, "PUT", "/machine-config", '{"vcpu_count": 1, "mem_size_mib": %d}' % mib)
        call(sock, "PUT", "/boot-source", '{"kernel_image_path": "%s"}' % kernel)
        call(sock, "PUT", "/actions", '{"action_type": "InstanceStart"}')
        assert ask(proc) == b"a"
        call(sock, "PATCH", "/vm", '{"state": "Paused"}')
        status, took = call(sock, "PUT", "/snapshot/create",
                            '{"snapshot_type": "Full", "snapshot_path": "%s", "mem_file_path": "%s"}'
                            % (snap, mem))
        assert "204" in status, status
        proc.kill()
        proc.wait()
        print(f"{vmm} {mib} MiB: create {took * 1000:.0f} ms; state file {os.path.getsize(snap)} B; "
              f"memory file {os.path.getsize(mem) >> 20} MiB, "
              f"{os.stat(mem).st_blocks * 512 >> 10} KiB allocated")
        body[vmm] = ('{"snapshot_path": "%s", "mem_backend": {"backend_type": "File", '
                     '"backend_path": "%s"}, "resume_vm": true}' % (snap, mem))
    requests = {vmm: [] for vmm in vmms}
    answers = {vmm: [] for vmm in vmms}
    own = {vmm: [] for vmm in vmms}
    cpu = []
    # Alternating, so that both VMMs see the same load on the machine.
    for i in range(runs):
        for vmm in vmms:
            sock = os.path.join(work, f"{vmm}-r{i}.sock")
            proc = start(vmm, sock)
            while not os.path.exists(sock):
                time.sleep(0.001)
            t0 = time.perf_counter()
            status, took = call(sock, "PUT", "/snapshot/load", body[vmm])
            answer = ask(proc)
            t1 = time.perf_counter()
            flush_metrics(vmm, sock)
            proc.kill()
            _, err = proc.communicate()
            assert "204" in status and answer == b"b", (vmm, status, answer)
            requests[vmm].append(took * 1000)
            answers[vmm].append((t1 - t0) * 1000)
            ms = own_restore_ms(vmm, sock, err)
            if ms is not None:
                own[vmm].append(ms)
            cpu_ms = pvm_restore_cpu_ms(err) if vmm == "pvm" else None
            if cpu_ms is not None:
                cpu.append(cpu_ms)
    for vmm in vmms:
        r, a, o = requests[vmm], answers[vmm], own[vmm] or [float("nan")]
        print(f"{vmm} {mib} MiB: load request {med(r):.1f} ms, load to the guest's first answer "
              f"{med(a):.1f} ms, own restore {med(o):.1f} ms (medians of {runs}; "
              f"min {min(r):.1f} / {min(a):.1f} / {min(o):.1f})")
    if cpu:
        print(f"pvm {mib} MiB: CPU time of its restore {med(cpu):.1f} ms "
              f"(median of {len(cpu)}; min {min(cpu):.1f}, max {max(cpu):.1f})")
    if len(vmms) == 2:
        print(f"{mib} MiB: pvm/Firecracker medians: load request "
              f"{med(requests['pvm']) / med(requests['firecracker']):.2f}, to the answer "
              f"{med(answers['pvm']) / med(answers['firecracker']):.2f}")
    for vmm in vmms:
        for suffix in (".snap", ".mem"):
            os.unlink(os.path.join(work, f"{vmm}-{mib}{suffix}"))
