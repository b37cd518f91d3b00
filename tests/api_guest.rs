//! pvm driven like Firecracker with real Linux guests (README "Driving pvm like Firecracker"):
//! the HTTP API on its Unix socket and the config file, in the emulated KVM host. busybox there
//! has no Unix-socket client, so the scripts call the API with `pvm-api-client`
//! (tests/api-client), one request per call, printed as `api METHOD PATH: EXIT STATUS BODY`.
//!
//! Scenarios: a whole boot through the API with a disk and a tap on virtio-mmio and with
//! `--enable-pci`; the same from a config file with `--no-api`; pause and resume of a counting
//! guest; SendCtrlAltDel reaching the guest's init; refused calls against a running VM; twenty
//! VMs driven in parallel; `smt` and `huge_pages` in machine-config.

mod common;

use common::{Batch, Kernel, Scenario, in_network_namespace, pattern, write_pattern};

const DISK_BYTES: usize = 1 << 20;
const GUEST_MAC: &str = "06:00:ac:10:00:02";

/// Shell helpers every scenario script starts with. `api` makes one call on `$sock` and
/// reports it; `api_at SOCK ...` on another socket; a call that fails or is refused also prints
/// `api-unexpected`, unless `expect_fault=1`. `wait_for FILE TEXT SECS` polls a log.
const HELPERS: &str = r#"api_at() {
    s=$1; shift
    r=$(pvm-api-client "$s" "$@"); c=$?
    echo "api $1 $2: $c $r"
    [ $c = 0 ] || [ "$expect_fault" = 1 ] || echo "api-unexpected $s $1 $2"
    return $c
}
api() { api_at "$sock" "$@"; }
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then echo "wait-timeout: no '$2' in $1"; return 1; fi
        usleep 100000
    done
}
sock=api.sock
"#;

/// The boot-source body for the scenario's initrd, with `extra` boot arguments. Firecracker's
/// usual line, `pci=off` included: pvm must drop it with `--enable-pci`.
fn boot_source(extra: &str) -> String {
    format!(
        r#"{{"kernel_image_path": "{{kernel}}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k pci=off quiet{extra}"}}"#
    )
}

fn drive() -> String {
    r#"{"drive_id": "rootfs", "path_on_host": "disk.img", "is_root_device": false, "is_read_only": false}"#.to_string()
}

fn interface(tap: &str) -> String {
    format!(r#"{{"iface_id": "eth0", "host_dev_name": "{tap}", "guest_mac": "{GUEST_MAC}"}}"#)
}

/// Script lines configuring `$sock`'s VM: 128 MiB, the initrd, and `devices` (PUT path, body).
fn configure(devices: &[(&str, String)]) -> String {
    let mut lines = vec![
        r#"api PUT /machine-config '{"vcpu_count": 1, "mem_size_mib": 128}'"#.to_string(),
        format!("api PUT /boot-source '{}'", boot_source("")),
    ];
    for (path, body) in devices {
        lines.push(format!("api PUT {path} '{body}'"));
    }
    lines.push(r#"api PUT /actions '{"action_type": "InstanceStart"}'"#.to_string());
    lines.join("\n") + "\n"
}

/// Starts pvm in the background on `$sock` with `flags`, its output in pvm.log.
fn start_pvm(flags: &str) -> String {
    format!("rm -f $sock\npvm --api-sock $sock --id vm0 {flags} > pvm.log 2>&1 &\npvm=$!\n")
}

/// Script lines waiting for pvm (`$pvm`), running `after`, showing pvm's output and exiting
/// with its exit code.
fn finish(after: &str) -> String {
    format!("wait $pvm\nrc=$?\n{after}cat pvm.log\necho \"pvm-exit $rc\"\nexit $rc\n")
}

/// Hands the disk image back to the test (in `out/`).
const KEEP_DISK: &str = "mkdir -p out && cp disk.img out/\n";

/// A scenario booting the minimal kernel with `init` as the guest's script; `body` runs on the
/// host side in a network namespace with tap0 (see [`in_network_namespace`]).
fn guest_scenario(name: &str, init: &str, body: &str) -> Scenario {
    Scenario::new(name)
        .kernel(Kernel::MinimalElf)
        .file(
            "initrd.cpio",
            common::guest_initramfs(init, Kernel::MinimalElf),
        )
        .program("pvm-api-client")
        .script(&in_network_namespace(body))
        .timeout(180)
}

/// The guest of the boot scenarios: the pattern on its only disk, a ping to the host.
fn disk_and_net_guest() -> String {
    format!(
        "echo \"transport-$(readlink -f /sys/block/vda/device | grep -q /pci && echo pci || echo mmio)\"\n\
         {}\
         ip link set eth0 up\n\
         ip addr add 10.0.2.2/24 dev eth0\n\
         echo \"guest-mac $(cat /sys/class/net/eth0/address)\"\n\
         ping -c 3 -W 5 10.0.2.1 >/dev/null && echo guest-ping-ok\n",
        write_pattern("F", "/dev/vda")
    )
}

/// Scenario 1: the whole boot through the API; `flags` is "" (mmio) or "--enable-pci".
fn api_boot(name: &str, flags: &str) -> Scenario {
    let body = format!(
        "{HELPERS}{}{}api GET /\n{}",
        start_pvm(flags),
        configure(&[
            ("/drives/rootfs", drive()),
            ("/network-interfaces/eth0", interface("tap0")),
        ]),
        finish(KEEP_DISK)
    );
    guest_scenario(name, &disk_and_net_guest(), &body).file("disk.img", vec![0; DISK_BYTES])
}

/// Scenario 2: the same VM from a config file, no API socket.
fn config_boot(name: &str) -> Scenario {
    let config = format!(
        r#"{{"boot-source": {},
 "drives": [{}],
 "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
 "network-interfaces": [{}]}}"#,
        boot_source(""),
        drive(),
        interface("tap0")
    );
    let body = format!(
        "cat > vm.json <<'EOF'\n{config}\nEOF\n\
         pvm --no-api --config-file vm.json > pvm.log 2>&1 &\n\
         pvm=$!\n{}",
        finish(&format!(
            "echo \"sockets: $(ls *.sock 2>/dev/null | wc -l)\"\n{KEEP_DISK}"
        ))
    );
    guest_scenario(name, &disk_and_net_guest(), &body).file("disk.img", vec![0; DISK_BYTES])
}

/// A scenario whose guest runs `init` (which must not end by itself) and whose host side,
/// after configuring and starting the VM, runs `host`, ends it with SendCtrlAltDel and runs
/// `after` once pvm has exited.
fn running_vm(
    name: &str,
    init: &str,
    devices: &[(&str, String)],
    host: &str,
    after: &str,
) -> Scenario {
    let body = format!(
        "{HELPERS}{}{}{host}\
         api PUT /actions '{{\"action_type\": \"SendCtrlAltDel\"}}'\n{}",
        start_pvm(""),
        configure(devices),
        finish(after)
    );
    guest_scenario(name, init, &body)
}

/// Scenario 3: pause and resume a guest that counts every 100 ms.
fn pause() -> Scenario {
    let init =
        "echo counting\ni=0\nwhile :; do i=$((i + 1)); echo \"count $i\"; usleep 100000; done\n";
    let host = r#"counts() { grep -c '^count ' pvm.log; }
wait_for pvm.log 'count 5' 120
api PATCH /vm '{"state": "Paused"}'
api GET /
usleep 300000; a=$(counts); sleep 1; b=$(counts)
echo "paused-counts $a $b"
api PATCH /vm '{"state": "Resumed"}'
api GET /
i=0
while [ "$(counts)" -le "$b" ] && [ $i -lt 100 ]; do i=$((i + 1)); usleep 100000; done
usleep 500000
echo "resumed-counts $b $(counts)"
"#;
    running_vm("api-pause", init, &[], host, "")
}

/// Scenario 4: SendCtrlAltDel types Ctrl-Alt-Del on the guest's keyboard. With
/// kernel.ctrl-alt-del=0 Linux sends init SIGINT for it; this init traps it, says so and
/// reboots, which ends the VM. The guest also shows its i8042 driver's boot messages.
fn ctrl_alt_del() -> Scenario {
    let init = "echo 0 > /proc/sys/kernel/ctrl-alt-del\n\
                trap 'echo guest-got-ctrl-alt-del; reboot -f' INT\n\
                dmesg | grep -i -e i8042 -e serio -e keyboard | sed 's/^/guest-dmesg: /'\n\
                echo \"guest-i8042-irqs $(grep -c i8042 /proc/interrupts)\"\n\
                echo guest-idle\n\
                sleep 1000 &\n\
                wait\n\
                echo guest-woke\n";
    // The time from the call to pvm's exit, taken before pvm's log is shown.
    running_vm(
        "api-ctrl-alt-del",
        init,
        &[],
        "wait_for pvm.log guest-idle 120\nstart=$(cut -d' ' -f1 /proc/uptime)\n",
        "end=$(cut -d' ' -f1 /proc/uptime)\n\
         echo \"$start $end\" | awk '{ printf \"ctrl-alt-del-seconds %.1f\\n\", $2 - $1 }'\n",
    )
}

/// Scenario 5: refused calls against a running VM, which keeps running (the host pings it).
fn errors() -> Scenario {
    let init =
        "ip link set eth0 up\nip addr add 10.0.2.2/24 dev eth0\necho guest-net-up\nsleep 1000\n";
    let host = format!(
        "wait_for pvm.log guest-net-up 120\n\
         expect_fault=1\n\
         api PUT /machine-config '{{\"vcpu_count\": 1, \"mem_size_mib\": 256}}'\n\
         api PUT /boot-source '{}'\n\
         api PUT /actions '{{\"action_type\": \"InstanceStart\"}}'\n\
         api GET /no-such-thing\n\
         api PATCH /vm '{{\"state\": \"Paused\"'\n\
         api PATCH /vm '{{\"state\": \"Paused\", \"speed\": 2}}'\n\
         expect_fault=0\n\
         api GET /\n\
         ping -c 3 -W 5 10.0.2.2 >/dev/null && echo host-ping-ok\n",
        boot_source("")
    );
    running_vm(
        "api-errors",
        init,
        &[("/network-interfaces/eth0", interface("tap0"))],
        &host,
        "",
    )
}

/// Huge pages the smt scenario reserves on the emulated host: its 128 MiB guest takes 64.
const HUGE_PAGES: u32 = 80;

/// Scenario 7: two 2-vCPU guests report their first CPU's SMT siblings. The first, with
/// `smt: true` and `huge_pages: "2M"` through the API, runs while the host counts its free huge
/// pages, and ends by SendCtrlAltDel (Linux's default: an immediate reboot); the second, with
/// `smt: false` from a config file, powers off by itself.
fn smt_and_huge_pages() -> Scenario {
    let init = "echo \"guest-siblings $(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)\"\n\
                echo \"guest-cpus $(grep -c ^processor /proc/cpuinfo)\"\n\
                grep -q pvmwait /proc/cmdline && { echo guest-idle; sleep 1000; }\n";
    let free = "awk '/HugePages_Free/ { print $2 }' /proc/meminfo";
    let body = format!(
        "{HELPERS}echo {HUGE_PAGES} > /proc/sys/vm/nr_hugepages\n\
         echo \"host-huge-free-before $({free})\"\n\
         {start}\
         api PUT /machine-config '{{\"vcpu_count\": 2, \"mem_size_mib\": 128, \"smt\": true, \"huge_pages\": \"2M\"}}'\n\
         api PUT /boot-source '{wait_boot}'\n\
         api PUT /actions '{{\"action_type\": \"InstanceStart\"}}'\n\
         wait_for pvm.log guest-idle 120\n\
         echo \"host-huge-free-running $({free})\"\n\
         api GET /machine-config\n\
         api PUT /actions '{{\"action_type\": \"SendCtrlAltDel\"}}'\n\
         wait $pvm\n\
         echo \"smt-exit $?\"\n\
         echo \"host-huge-free-after $({free})\"\n\
         echo 0 > /proc/sys/vm/nr_hugepages\n\
         sed 's/^/smt: /' pvm.log\n\
         cat > vm.json <<'EOF'\n\
         {{\"boot-source\": {plain_boot}, \"machine-config\": {{\"vcpu_count\": 2, \"mem_size_mib\": 128, \"smt\": false}}}}\n\
         EOF\n\
         pvm --no-api --config-file vm.json > plain.log 2>&1\n\
         echo \"plain-exit $?\"\n\
         sed 's/^/plain: /' plain.log\n",
        start = start_pvm(""),
        wait_boot = boot_source(" pvmwait"),
        plain_boot = boot_source(""),
    );
    guest_scenario("api-smt-huge-pages", init, &body)
}

fn scenarios() -> Vec<Scenario> {
    vec![
        api_boot("api-boot-mmio", ""),
        api_boot("api-boot-pci", "--enable-pci"),
        config_boot("config-boot-mmio"),
        pause(),
        ctrl_alt_del(),
        errors(),
        parallel_scenario(),
        smt_and_huge_pages(),
    ]
}

static BATCH: Batch = Batch::new(scenarios);

/// The API calls the scenario made, in order, as (`METHOD PATH`, what came back).
fn calls(name: &str) -> Vec<(String, String)> {
    let outcome = BATCH.outcome(name);
    outcome
        .console
        .lines()
        .filter_map(|l| l.strip_prefix("api "))
        .filter_map(|l| l.split_once(": "))
        .map(|(call, answer)| (call.to_string(), answer.to_string()))
        .collect()
}

/// Asserts that call `call` (e.g. "PUT /actions") was answered with `answer` (a prefix, e.g.
/// "0 204") on its `nth` occurrence, and returns the whole answer.
fn answered(name: &str, call: &str, nth: usize, answer: &str) -> String {
    let found = calls(name)
        .into_iter()
        .filter(|(c, _)| c == call)
        .nth(nth)
        .map(|(_, a)| a);
    match found {
        Some(a) if a.starts_with(answer) => a,
        other => {
            BATCH.outcome(name).dump();
            panic!("{name}: {call} (#{nth}) answered {other:?}, expected {answer:?}...");
        }
    }
}

fn check_guest_disk_and_net(name: &str, transport: &str) {
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("pvm-exit 0");
    outcome.assert_contains(&format!("transport-{transport}"));
    outcome.assert_contains("F-write-ok");
    outcome.assert_contains(&format!("guest-mac {GUEST_MAC}"));
    outcome.assert_contains("guest-ping-ok");
    let image = std::fs::read(outcome.out.join("disk.img")).unwrap();
    let expected = pattern("F", 4096);
    assert_eq!(image.len(), DISK_BYTES, "{name}: disk.img changed size");
    if image[..expected.len()] != expected[..] || image[expected.len()..].iter().any(|b| *b != 0) {
        outcome.dump();
        panic!("{name}: disk.img does not hold exactly the guest's pattern");
    }
}

fn check_api_boot(name: &str, transport: &str) {
    for call in [
        "PUT /machine-config",
        "PUT /boot-source",
        "PUT /drives/rootfs",
        "PUT /network-interfaces/eth0",
        "PUT /actions",
    ] {
        answered(name, call, 0, "0 204");
    }
    let info = answered(name, "GET /", 0, "0 200 ");
    assert!(
        info.contains(r#""id":"vm0""#) && info.contains(r#""state":"Running""#),
        "{name}: GET / answered {info}"
    );
    BATCH.outcome(name).assert_lacks("api-unexpected");
    check_guest_disk_and_net(name, transport);
}

#[test]
fn api_boot_with_disk_and_tap_on_mmio() {
    check_api_boot("api-boot-mmio", "mmio");
}

#[test]
fn api_boot_with_disk_and_tap_on_pci() {
    check_api_boot("api-boot-pci", "pci");
}

#[test]
fn config_file_boot_with_disk_and_tap() {
    check_guest_disk_and_net("config-boot-mmio", "mmio");
    BATCH
        .outcome("config-boot-mmio")
        .assert_contains("sockets: 0");
}

#[test]
fn pause_and_resume_through_the_api() {
    let name = "api-pause";
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_lacks("api-unexpected");
    answered(name, "PATCH /vm", 0, "0 204");
    answered(name, "PATCH /vm", 1, "0 204");
    let paused = answered(name, "GET /", 0, "0 200 ");
    assert!(paused.contains(r#""state":"Paused""#), "{name}: {paused}");
    let resumed = answered(name, "GET /", 1, "0 200 ");
    assert!(
        resumed.contains(r#""state":"Running""#),
        "{name}: {resumed}"
    );
    let paused = count_words(outcome, "paused-counts ");
    let resumed = count_words(outcome, "resumed-counts ");
    let ok =
        matches!(paused[..], [a, b] if a == b && a >= 5) && matches!(resumed[..], [b, c] if c > b);
    if !ok {
        outcome.dump();
        panic!("{name}: counts while paused {paused:?}, after resuming {resumed:?}");
    }
}

#[test]
fn send_ctrl_alt_del_ends_the_vm() {
    let name = "api-ctrl-alt-del";
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("pvm-exit 0");
    outcome.assert_contains("guest-idle");
    // The keys reached init: the kernel turned them into SIGINT, not pvm into a reset.
    outcome.assert_contains("guest-got-ctrl-alt-del");
    outcome.assert_contains("guest-i8042-irqs 1");
    outcome.assert_contains("serio: i8042 KBD port at 0x60,0x64");
    outcome.assert_contains("AT Raw Set 2 keyboard");
    outcome.assert_lacks("Can't read CTR");
    outcome.assert_lacks("guest-woke");
    outcome.assert_lacks("api-unexpected");
    answered(name, "PUT /actions", 1, "0 204");
    let seconds: f64 = outcome.word_after("ctrl-alt-del-seconds ").parse().unwrap();
    assert!(seconds < 30.0, "{name}: the VM took {seconds} s to end");
}

#[test]
fn refused_calls_leave_the_vm_running() {
    let name = "api-errors";
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_contains("pvm-exit 0");
    outcome.assert_lacks("api-unexpected");
    let after_start = "The requested operation is not supported after starting the microVM.";
    let fault = |call: &str, nth: usize, want: &str| {
        let answer = answered(name, call, nth, r#"1 400 {"fault_message":"#);
        assert!(answer.contains(want), "{name}: {call} answered {answer}");
    };
    fault("PUT /machine-config", 1, after_start);
    fault("PUT /boot-source", 1, after_start);
    // #0 is the InstanceStart that booted the VM.
    fault("PUT /actions", 1, after_start);
    fault(
        "GET /no-such-thing",
        0,
        "Invalid request method and/or path: GET no-such-thing.",
    );
    fault(
        "PATCH /vm",
        0,
        "An error occurred when deserializing the json body of a request",
    );
    fault("PATCH /vm", 1, "unknown field `speed`");
    let info = answered(name, "GET /", 0, "0 200 ");
    assert!(info.contains(r#""state":"Running""#), "{name}: {info}");
    outcome.assert_contains("host-ping-ok");
    // The SendCtrlAltDel that ended it.
    answered(name, "PUT /actions", 2, "0 204");
}

/// VMs in the parallel scenario: the twenty the issue asks for. The emulated host has 3 GiB
/// and one vCPU; twenty 64 MiB guests (touched only in part) fit, and all of them boot, get
/// paused, resumed and stopped in about 85 s on that one TCG vCPU.
const PARALLEL_VMS: usize = 20;

/// Scenario 6: `PARALLEL_VMS` pvm processes, each with its own socket and tap, started,
/// configured, paused, resumed and stopped through their APIs, each phase in parallel;
/// afterwards no pvm runs, no socket listens and no tap is held open.
fn parallel_scenario() -> Scenario {
    // The guest learns its number from the command line (vmn=N), its network from that.
    let init = r#"n=$(sed -n 's/.*vmn=\([0-9]*\).*/\1/p' /proc/cmdline)
ip link set eth0 up
ip addr add 10.1.$n.2/24 dev eth0
ping -c 2 -W 10 10.1.$n.1 >/dev/null && echo "vm$n-ping-ok"
echo "vm$n-up"
i=0
while :; do i=$((i + 1)); echo "tick $i"; sleep 0.5; done
"#;
    let boot = boot_source(" vmn=$1").replace('"', "\\\"");
    let body = format!(
        r#"{HELPERS}N={PARALLEL_VMS}
# Runs "$@ N" for every VM at once and waits for all of them.
each() {{
    pids=""
    for n in $(seq 1 $N); do "$@" $n & pids="$pids $!"; done
    for p in $pids; do wait $p; done
}}
listening() {{ netstat -xl 2>/dev/null | grep -c 'vm[0-9]*\.sock'; }}
ticks() {{ grep -c '^tick ' vm$1.log; }}
for n in $(seq 1 $N); do
    tunctl -t tap$n >/dev/null
    ip link set tap$n up
    ip addr add 10.1.$n.1/24 dev tap$n
    rm -f vm$n.sock
    pvm --api-sock vm$n.sock --id vm$n > vm$n.log 2>&1 &
    echo $! > vm$n.pid
done
configure() {{
    api_at vm$1.sock PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 64}}' &&
    api_at vm$1.sock PUT /boot-source "{boot}" &&
    api_at vm$1.sock PUT /network-interfaces/eth0 "{{\"iface_id\": \"eth0\", \"host_dev_name\": \"tap$1\"}}" &&
    api_at vm$1.sock PUT /actions '{{"action_type": "InstanceStart"}}'
}}
each configure
for n in $(seq 1 $N); do wait_for vm$n.log vm$n-up 400; done
echo "listening-while-running $(listening)"
# A tap shows NO-CARRIER while no process has it open.
tap_state() {{ ip link show tap$1 | grep -q NO-CARRIER && echo detached || echo attached; }}
for n in $(seq 1 $N); do echo "tap$n-while-running $(tap_state $n)"; done
pause() {{ api_at vm$1.sock PATCH /vm '{{"state": "Paused"}}'; }}
resume() {{ api_at vm$1.sock PATCH /vm '{{"state": "Resumed"}}'; }}
state() {{ echo "vm$1-state $(pvm-api-client vm$1.sock GET /)"; }}
each pause
each state
usleep 500000
for n in $(seq 1 $N); do echo "$(ticks $n)" > vm$n.paused; done
sleep 1
for n in $(seq 1 $N); do echo "vm$n-paused-ticks $(cat vm$n.paused) $(ticks $n)"; done
each resume
resumed() {{
    i=0
    while [ "$(ticks $1)" -le "$(cat vm$1.paused)" ] && [ $i -lt 600 ]; do i=$((i + 1)); usleep 100000; done
    echo "vm$1-resumed-ticks $(ticks $1)"
}}
each resumed
stop() {{ api_at vm$1.sock PUT /actions '{{"action_type": "SendCtrlAltDel"}}'; }}
each stop
for n in $(seq 1 $N); do wait $(cat vm$n.pid); echo "vm$n-exit $?"; done
echo "pvm-left $(pidof pvm | wc -w)"
echo "listening-after $(listening)"
# The kernel may drop a vhost-net device's hold on its tap a moment after pvm is gone (the
# last reference can be put from a vhost worker, deferred); a tap still held 10 s on is left
# behind.
any_attached() {{
    for n in $(seq 1 $N); do [ "$(tap_state $n)" = attached ] && return 0; done
    return 1
}}
i=0
while [ $i -lt 100 ] && any_attached; do
    i=$((i + 1)); usleep 100000
done
echo "taps-released-after-ms $((i * 100))"
for n in $(seq 1 $N); do
    echo "tap$n-after $(tap_state $n)"
    ip link delete tap$n
done
# (/sys/class/net shows the host's namespace, not this one.)
echo "taps-left $(ip link show | grep -c ': tap[1-9]')"
rm -f vm*.sock
for n in $(seq 1 $N); do sed "s/^/vm$n: /" vm$n.log | grep -v ': tick '; done
"#
    );
    // 80-110 s in CI runs (20 VMs). A frozen emulated host is only noticed at the timeout
    // (plus slack), and this scenario froze in two CI runs in a row: 900 s then cost a quarter
    // hour of CI each time. 420 s is still about four times its usual length.
    guest_scenario("api-parallel", init, &body).timeout(420)
}

#[test]
fn many_vms_driven_in_parallel() {
    let name = "api-parallel";
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_lacks("api-unexpected");
    outcome.assert_lacks("wait-timeout");
    let count = |prefix: &str| outcome.word_after(prefix);
    assert_eq!(count("listening-while-running "), PARALLEL_VMS.to_string());
    for n in 1..=PARALLEL_VMS {
        outcome.assert_contains(&format!("vm{n}-ping-ok"));
        outcome.assert_contains(&format!("vm{n}-exit 0"));
        let state = outcome
            .console
            .lines()
            .find_map(|l| l.strip_prefix(&format!("vm{n}-state ")));
        assert!(
            state.is_some_and(|s| s.starts_with("200 ") && s.contains(r#""state":"Paused""#)),
            "{name}: vm{n} GET / while paused: {state:?}"
        );
        let paused: Vec<u32> = count_words(outcome, &format!("vm{n}-paused-ticks "));
        let resumed: u32 = count(&format!("vm{n}-resumed-ticks ")).parse().unwrap_or(0);
        let ok = matches!(paused[..], [a, b] if a == b && a > 0 && resumed > b);
        if !ok {
            outcome.dump();
            panic!("{name}: vm{n}: ticks while paused {paused:?}, after resuming {resumed}");
        }
        assert_eq!(count(&format!("tap{n}-while-running ")), "attached");
        assert_eq!(
            count(&format!("tap{n}-after ")),
            "detached",
            "{name}: tap{n} still held 10 s after its pvm exited"
        );
    }
    assert_eq!(count("pvm-left "), "0", "{name}: pvm processes left");
    assert_eq!(
        count("listening-after "),
        "0",
        "{name}: sockets still listening"
    );
    assert_eq!(count("taps-left "), "0", "{name}: taps left");
}

#[test]
fn smt_pairs_vcpus_and_huge_pages_back_the_guest() {
    let name = "api-smt-huge-pages";
    let outcome = BATCH.outcome(name);
    outcome.assert_rc(0);
    outcome.assert_lacks("api-unexpected");
    outcome.assert_lacks("wait-timeout");
    outcome.assert_contains("smt-exit 0");
    outcome.assert_contains("plain-exit 0");
    for (vm, siblings) in [("smt", "0-1"), ("plain", "0")] {
        assert_eq!(
            outcome.word_after(&format!("{vm}: guest-siblings ")),
            siblings
        );
        assert_eq!(outcome.word_after(&format!("{vm}: guest-cpus ")), "2");
    }
    let machine = answered(name, "GET /machine-config", 0, "0 200 ");
    assert!(
        machine.contains(r#""smt":true"#) && machine.contains(r#""huge_pages":"2M""#),
        "{name}: {machine}"
    );
    let free = |when: &str| -> u32 {
        let word = outcome.word_after(&format!("host-huge-free-{when} "));
        word.parse()
            .unwrap_or_else(|_| panic!("{name}: free huge pages {when}: {word:?}"))
    };
    assert_eq!(free("before"), HUGE_PAGES, "{name}: the host reserved them");
    assert_eq!(
        free("running"),
        HUGE_PAGES - 64,
        "{name}: 128 MiB of the guest's"
    );
    assert_eq!(
        free("after"),
        HUGE_PAGES,
        "{name}: given back when pvm ended"
    );
}

/// The numbers on the first console line starting with `prefix`.
fn count_words(outcome: &common::Outcome, prefix: &str) -> Vec<u32> {
    outcome
        .console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}
