#!/usr/bin/env python3
"""Start-up cost of the VMM itself: process start -> KVM VM, memory, devices, ACPI, kernel load,
vCPUs -> guest runs -> guest powers off -> pvm exits. The guest is a hand-made one-instruction
ELF that writes the ACPI sleep register (the same micro guest tests/cli.rs uses), so the figure
is pvm's own overhead, not a kernel's boot. Also reports pvm's peak RSS (guest memory is
MAP_NORESERVE and untouched, so it is not counted).

It also runs pvm with --boot-timer, which reports the time from pvm's main() to the first
KVM_RUN and the CPU time (user + system, all threads) spent by then.

Usage: benches/startup.py [RUNS]   (builds target/release/pvm first)
"""
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time

runs = int(sys.argv[1]) if len(sys.argv) > 1 else 30
root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
subprocess.run(["cargo", "build", "--release", "-q", "--bin", "pvm"], cwd=root, check=True)
pvm = os.path.join(root, "target/release/pvm")

# mov dx, 0x3c0; mov al, (5 << 2) | 0x20; out dx, al; hlt
code = bytes([0x66, 0xBA, 0xC0, 0x03, 0xB0, 0x34, 0xEE, 0xF4])
load = 0x100000
ehdr = b"\x7fELF\x02\x01\x01" + b"\0" * 9 + struct.pack(
    "<HHIQQQIHHHHHH", 2, 0x3E, 1, load, 64, 0, 0, 64, 56, 1, 0, 0, 0)
phdr = struct.pack("<IIQQQQQQ", 1, 5, 0x1000, load, load, len(code), len(code), 0x1000)
image = (ehdr + phdr).ljust(0x1000, b"\0") + code
kernel = tempfile.NamedTemporaryFile(suffix=".elf", delete=False)
kernel.write(image)
kernel.close()

for mem, cpus in (("512M", 1), ("4G", 4)):
    args = [pvm, "--kernel", kernel.name, "--mem", mem, "--cpus", str(cpus), "--log-level", "off"]
    times = []
    first_run = []
    cpu_ms = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(args + ["--boot-timer"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, check=True)
        times.append((time.perf_counter() - start) * 1000)
        # "pvm: boot-timer: first KVM_RUN 12.062 ms after pvm started, 3.110 CPU-ms"
        line = next(l for l in done.stderr.splitlines() if "first KVM_RUN" in l)
        words = line.split()
        first_run.append(float(words[4]))
        cpu_ms.append(float(words[-2]))
    times.sort()
    print(f"start-up --mem {mem} --cpus {cpus}: main() to first KVM_RUN median "
          f"{statistics.median(first_run):.1f} ms wall, {statistics.median(cpu_ms):.1f} CPU-ms "
          f"(all threads, user+system) over {runs} runs")
    # GNU time execs pvm directly, so the peak is pvm's own (a forked Python would count too).
    timed = subprocess.run(["/usr/bin/time", "-f", "%M"] + args, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True, check=True)
    rss_kib = int(timed.stderr.strip().splitlines()[-1])
    print(f"startup --mem {mem} --cpus {cpus}: median {statistics.median(times):.1f} ms, "
          f"p10 {times[len(times) // 10]:.1f} ms, p90 {times[len(times) * 9 // 10]:.1f} ms "
          f"over {runs} runs; pvm peak RSS {rss_kib / 1024:.1f} MiB")
os.unlink(kernel.name)
