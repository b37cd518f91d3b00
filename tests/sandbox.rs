//! `pvm` with no boot files and `pvm -- COMMAND` (the sandbox), in the emulated KVM host: pvm
//! boots that host's own kernel (Debian's cloud kernel) with its root shared read-only over
//! virtio-fs under a tmpfs overlay, loading the modules from /lib/modules like on any host.
//! The emulated host's initramfs has no /boot or /lib/modules tree, so the scenario provides
//! them (scripts/guest-assets keeps the module subtree and depmod's files); on a direct host it
//! uses the host's own. One scenario, two boots:
//!
//! - `pvm -- sh -c ...` reads a file and lists a directory the scenario made on the host,
//!   writes over that file, and exits 7: its output is pvm's stdout, pvm exits 7, and the
//!   host's file is unchanged afterwards.
//! - `pvm` alone with commands piped to its stdin once the shell's prompt shows: the shell runs
//!   a command and `exit 3`.

mod common;

use std::path::Path;

use common::{Batch, Kernel, Scenario, assets};

static BATCH: Batch = Batch::new(scenarios);

const SCRIPT: &str = r#"
rel=$(uname -r)
# The host's kernel and module tree where pvm looks for them; a host that has them keeps its own.
if [ ! -e /boot/vmlinuz-$rel ]; then mkdir -p /boot && cp {kernel} /boot/vmlinuz-$rel; fi
if [ ! -e /lib/modules/$rel/modules.dep ]; then
    mkdir -p /lib/modules && cp -r lib/modules/$rel /lib/modules/
fi
probe=$PWD/probe
mkdir -p $probe/dir-made-by-the-scenario out
echo host-original-42 > $probe/hello.txt
pvm --mem 512M -- sh -c "cat $probe/hello.txt; ls $probe; \
    echo guest-wrote > $probe/hello.txt && echo GUEST-WRITE-OK; cat $probe/hello.txt; exit 7" \
    > out/command.txt 2> out/command.err
echo "command-rc=$?"
echo "host-after=$(cat $probe/hello.txt)"
# The shell's input through a pipe, once its prompt is there: what a serial line carries
# before the guest's driver opens the port is lost, as on real hardware.
mkfifo shell.in
pvm --mem 512M < shell.in > out/shell.txt 2>&1 &
pvm_pid=$!
exec 3> shell.in
i=0
while ! grep -qs '# ' out/shell.txt && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
printf 'echo SHELL-$((6 * 7))\nexit 3\n' >&3
exec 3>&-
wait $pvm_pid
echo "shell-rc=$?"
echo "--- command stdout"; cat out/command.txt
echo "--- command stderr"; cat out/command.err
echo "--- shell"; cat out/shell.txt
"#;

fn scenarios() -> Vec<Scenario> {
    let release = std::fs::read_to_string(assets().join("debian/release")).unwrap();
    let tree = format!("lib/modules/{}", release.trim());
    let mut scenario = Scenario::new("sandbox")
        .kernel(Kernel::DebianBzImage)
        .script(SCRIPT)
        .timeout(240);
    let root = assets().join("debian/sandbox-modules");
    for file in files_under(&root.join(&tree)) {
        let relative = file
            .strip_prefix(&root)
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        scenario = scenario.file(&relative, std::fs::read(&file).unwrap());
    }
    vec![scenario]
}

fn files_under(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

fn command_output() -> String {
    let outcome = BATCH.outcome("sandbox");
    std::fs::read_to_string(outcome.out.join("command.txt")).unwrap_or_else(|e| {
        outcome.dump();
        panic!("no command output: {e}")
    })
}

#[test]
fn a_command_prints_its_output_and_pvm_exits_with_its_status() {
    let outcome = BATCH.outcome("sandbox");
    outcome.assert_rc(0);
    outcome.assert_contains("command-rc=7\n");
    let out = command_output();
    let lines: Vec<&str> = out.lines().collect();
    if lines.first() != Some(&"host-original-42") {
        outcome.dump();
        panic!("the command's output does not start with the host file: {out:?}");
    }
}

#[test]
fn the_guest_sees_the_hosts_files() {
    // `ls` on the guest's terminal lists in columns.
    let out = command_output();
    assert!(
        out.split_whitespace()
            .any(|w| w == "dir-made-by-the-scenario"),
        "{out:?}"
    );
}

#[test]
fn writes_land_in_the_overlay_and_never_reach_the_host() {
    let outcome = BATCH.outcome("sandbox");
    let out = command_output();
    assert!(out.contains("GUEST-WRITE-OK\nguest-wrote\n"), "{out:?}");
    outcome.assert_contains("host-after=host-original-42\n");
}

#[test]
fn the_shell_runs_what_the_terminal_sends_and_exits_with_its_status() {
    let outcome = BATCH.outcome("sandbox");
    outcome.assert_contains("shell-rc=3\n");
    outcome.assert_contains("SHELL-42");
}
