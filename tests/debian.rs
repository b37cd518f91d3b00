//! The demo's Debian 12 image (scripts/debian-image, `debian.img` in the assets) boots under
//! pvm from its own disk: `pvm --disk /dev/vdX --tap tap0`, with no --kernel, and a
//! `--cloud-init` NoCloud seed. One boot serves every check: systemd reaches the end of its
//! start-up, cloud-init set the hostname and root's ssh key the seed's user-data asked for (a
//! key made fresh for each run, not the image's), the guest pings the host, ssh from the host
//! (with the image's test key, which the seed's key joins) runs a command in the guest, and
//! `poweroff` in the guest ends pvm with 0. The guest is driven through its console: root is
//! logged in there, and the script types into pvm's stdin (a FIFO) once the shell prompt shows.

mod common;

use std::io::Read;
use std::path::PathBuf;
use std::process::Command;

use common::{Batch, Scenario};

static BATCH: Batch = Batch::new(scenarios);

/// The guest's and the host's addresses on tap0, as the image configures them.
const GUEST_IP: &str = "172.16.0.2";
const HOST_IP: &str = "172.16.0.1";

/// Units the test masks on the kernel command line (the image stays the demo's): they load
/// modules nothing here uses, ~35 s of a ~110 s boot under the emulated host.
const MASKED: &str = "systemd.mask=modprobe@dm_mod.service systemd.mask=modprobe@fuse.service \
                      systemd.mask=modprobe@loop.service";

/// Standard base64 with padding (the encoding of an ssh public key's blob).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut text = String::new();
    for chunk in bytes.chunks(3) {
        let mut group = [0u8; 3];
        group[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from_be_bytes([0, group[0], group[1], group[2]]);
        for i in 0..4 {
            if i <= chunk.len() {
                text.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                text.push('=');
            }
        }
    }
    text
}

/// The seed's ssh key and hostname for this run, made once (the batch and the checks share
/// them). The key is 32 random bytes, so neither an earlier run's nor the image's can match;
/// only its line is checked, nobody logs in with it.
fn seeded() -> &'static (String, String) {
    static SEEDED: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    SEEDED.get_or_init(|| {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .expect("/dev/urandom");
        let mut blob = Vec::new();
        for field in [&b"ssh-ed25519"[..], &key] {
            blob.extend((field.len() as u32).to_be_bytes());
            blob.extend(field);
        }
        let line = format!("ssh-ed25519 {} pvm-cloud-init-test", base64(&blob));
        (line, format!("seeded-{}", std::process::id()))
    })
}

/// The seed's user-data: a hostname and one more key for root.
fn user_data() -> String {
    let (key, hostname) = seeded();
    format!(
        "#cloud-config\n\
         hostname: {hostname}\n\
         disable_root: false\n\
         ssh_authorized_keys:\n  - {key}\n"
    )
}

/// The word after the last `marker` on the console: the guest's lines start with the terminal's
/// escape sequences, so they cannot be matched from the line start.
fn value_after(outcome: &common::Outcome, marker: &str) -> String {
    // The last one: the script's own progress lines ("seen STATE-2= at ...") come first.
    let console = &outcome.console;
    let value = console.rfind(marker).and_then(|at| {
        console[at + marker.len()..]
            .split_whitespace()
            .next()
            .map(|word| word.trim_end_matches(|c: char| c.is_control()).to_string())
    });
    value.unwrap_or_else(|| {
        outcome.dump();
        panic!("no {marker} on the console")
    })
}

/// The run script. Markers the guest prints are computed there (`$((...))`), so the console's
/// echo of the typed command never contains them.
fn script() -> String {
    let (key, _) = seeded();
    format!(
        r#"set -u
mkdir -p out
# The ssh client of the build machine with its libraries (the emulated host is busybox), run
# through their dynamic loader; OpenSSH wants a passwd entry for its user.
grep -q '^root:' /etc/passwd 2>/dev/null || echo 'root:x:0:0:root:/root:/bin/sh' >> /etc/passwd
export HOME=$PWD
chmod 600 id_ed25519
S={{shared}}/ssh
ssh() {{
    "$S"/lib/ld-linux-x86-64.so.2 --library-path "$S/lib" "$S/bin/ssh" -i id_ed25519 \
        -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o ConnectTimeout=30 \
        -o BatchMode=yes "$@"
}}
# tap0 comes from common::in_network_namespace; the image's subnet is added to it.
ip addr add {HOST_IP}/24 dev tap0
mkfifo console-in
# Holds the FIFO open, so pvm never reads end-of-file between typed lines.
sleep 100000 > console-in &
holder=$!
start=$(cut -d' ' -f1 /proc/uptime)
pvm --disk {{disk}} --tap tap0 --cpus 2 --mem 1G --cmdline "quiet {MASKED}" \
    --id debian-seeded --cloud-init user-data=user-data < console-in > guest.log 2>&1 &
pvm=$!
elapsed() {{ awk -v s="$start" '{{ printf "%.0f", $1 - s }}' /proc/uptime; }}
# Waits (up to $2 s) for guest.log to hold $1; says how long it took.
wait_for() {{
    i=0
    while ! grep -q "$1" guest.log; do
        kill -0 $pvm 2>/dev/null || {{ echo "pvm ended while waiting for $1"; return 1; }}
        i=$((i + 1))
        [ $i -le $(($2 * 2)) ] || {{ echo "no $1 after $2 s"; return 1; }}
        sleep 0.5
    done
    echo "seen $1 at $(elapsed) s"
}}
type_line() {{ printf '%s\n' "$1" > console-in; }}
finish() {{
    kill $holder 2>/dev/null
    echo "--- guest console ---"
    cat guest.log
}}
# The shell's prompt, not just the host name: until the shell runs, typed lines are lost.
# The prompt has the image's host name or the seed's, whichever was set when the shell began.
if wait_for 'root@[a-z0-9-]*:~#' 420; then
    type_line 'echo "STATE-$((1+1))=$(systemctl is-system-running --wait)"; systemctl --failed --no-legend --plain | sed "s/^/FAILED-UNIT /"'
    wait_for 'STATE-2=' 360
    type_line 'echo "SEED-$((7+7)) $(hostname) $(grep -cxF "{key}" /root/.ssh/authorized_keys)"'
    wait_for 'SEED-14 ' 60
    # What cloud-init warned of or failed on, for the test's output.
    type_line 'grep -E "WARNING|ERROR|Traceback|failed" /var/log/cloud-init.log | tail -n 20 | sed "s/^/CLOUD-INIT-LOG /"; echo "LOG-$((4+4))-DONE"'
    wait_for 'LOG-8-DONE' 60
    # How long the boot took, in the test's output (`systemd-analyze blame` costs ~50 s here).
    type_line 'systemd-analyze time; echo "TIME-$((3+3))-DONE"'
    wait_for 'TIME-6-DONE' 60
    type_line 'ping -c 2 -W 5 {HOST_IP} > /dev/null && echo "PING-$((2+2))-OK"'
    wait_for 'PING-4-OK' 60
    ssh root@{GUEST_IP} 'echo "SSH-$((40+2)) $(hostname) $(id -un)"' > out/ssh.txt 2> out/ssh.err
    echo "ssh rc=$? at $(elapsed) s: $(cat out/ssh.txt) $(tail -n 3 out/ssh.err)"
    # The management subcommands on this VM, over its run-directory API socket.
    pvm list > out/list.txt 2>&1
    echo "LIST rc=$?"; sed 's/^/LIST-LINE /' out/list.txt
    echo "STATUS rc=$(pvm status debian-seeded --json > out/status.json 2>&1; echo $?) $(tr -d '\n' < out/status.json)"
    echo "PAUSE rc=$(pvm pause debian-seeded > /dev/null 2>&1; echo $?) $(pvm status debian-seeded --json | tr -d '\n')"
    echo "RESUME rc=$(pvm resume debian-seeded > /dev/null 2>&1; echo $?) $(pvm status debian-seeded --json | tr -d '\n')"
    type_line 'ping -c 1 -W 5 {HOST_IP} > /dev/null && echo "PING-$((3+3))-AGAIN"'
    wait_for 'PING-6-AGAIN' 60
    type_line 'poweroff'
fi
i=0
while kill -0 $pvm 2>/dev/null && [ $i -lt 240 ]; do i=$((i + 1)); sleep 0.5; done
kill -0 $pvm 2>/dev/null && {{ echo "pvm still running after poweroff"; kill -9 $pvm; }}
wait $pvm
rc=$?
echo "PVM-RC=$rc at $(elapsed) s"
finish
exit $rc
"#
    )
}

/// The build machine's ssh client and the libraries it loads, as (path in the batch's shared
/// directory, host path).
fn ssh_client_files() -> Vec<(String, PathBuf)> {
    let ssh = PathBuf::from("/usr/bin/ssh");
    let out = Command::new("ldd")
        .arg(&ssh)
        .output()
        .expect("ldd (libc-bin)");
    assert!(
        out.status.success(),
        "ldd /usr/bin/ssh failed (openssh-client, scripts/host-packages)"
    );
    let mut files = vec![("ssh/bin/ssh".to_string(), ssh)];
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // "libz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)".
        let path = line
            .split_whitespace()
            .find(|word| word.starts_with('/'))
            .map(PathBuf::from);
        if let Some(path) = path {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            files.push((format!("ssh/lib/{name}"), path));
        }
    }
    files
}

fn scenarios() -> Vec<Scenario> {
    let assets = common::assets();
    let key = std::fs::read(assets.join("id_ed25519"))
        .expect("the Debian image's test key (scripts/guest-assets)");
    let mut scenario = Scenario::new("debian-boot")
        .script(&common::in_network_namespace(&script()))
        .disk_image(&assets.join("debian.img"))
        .file("id_ed25519", key)
        .file("user-data", user_data().into_bytes())
        .timeout(900);
    for (path, from) in ssh_client_files() {
        scenario = scenario.shared_file(&path, &from);
    }
    vec![scenario]
}

#[test]
fn systemd_comes_up() {
    let outcome = BATCH.outcome("debian-boot");
    // "running", or "degraded" with the failed units listed: either way the boot finished.
    // The typed command holds "STATE-$((1+1))=", never "STATE-2=".
    let state = value_after(outcome, "STATE-2=");
    if state != "running" {
        outcome.dump();
        panic!("systemctl is-system-running: {state}");
    }
    outcome.assert_lacks("Kernel panic");
}

#[test]
fn cloud_init_sets_the_hostname_and_roots_key_from_the_seed() {
    let outcome = BATCH.outcome("debian-boot");
    let (_, hostname) = seeded();
    // The typed command holds "SEED-$((7+7))", never "SEED-14".
    outcome.assert_contains(&format!("SEED-14 {hostname} 1"));
}

#[test]
fn list_status_pause_and_resume_reach_the_running_vm() {
    let outcome = BATCH.outcome("debian-boot");
    outcome.assert_contains("LIST rc=0");
    let listed = outcome
        .console
        .lines()
        .any(|l| l.starts_with("LIST-LINE debian-seeded") && l.contains("Running"));
    if !listed {
        outcome.dump();
        panic!("pvm list does not show debian-seeded running");
    }
    outcome.assert_contains("STATUS rc=0 {");
    outcome.assert_contains("PAUSE rc=0 ");
    outcome.assert_contains("RESUME rc=0 ");
    // The guest answers again after the resume.
    outcome.assert_contains("PING-6-AGAIN");
    for (marker, state) in [("PAUSE rc=0 ", "Paused"), ("RESUME rc=0 ", "Running")] {
        let line = outcome.console.lines().find(|l| l.starts_with(marker));
        let want = format!("\"state\": \"{state}\"");
        assert!(
            line.is_some_and(|l| l.contains(&want)),
            "{marker}: {line:?} lacks {want}"
        );
    }
}

#[test]
fn guest_pings_the_host() {
    BATCH.outcome("debian-boot").assert_contains("PING-4-OK");
}

#[test]
fn ssh_from_the_host_runs_a_command() {
    let outcome = BATCH.outcome("debian-boot");
    outcome.assert_contains("ssh rc=0");
    let (_, hostname) = seeded();
    outcome.assert_contains(&format!("SSH-42 {hostname} root"));
}

#[test]
fn poweroff_in_the_guest_ends_pvm_with_zero() {
    let outcome = BATCH.outcome("debian-boot");
    outcome.assert_contains("PVM-RC=0");
    outcome.assert_rc(0);
}
