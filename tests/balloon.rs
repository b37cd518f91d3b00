//! virtio-balloon with Debian's cloud kernel (its virtio_balloon.ko insmod-ed from the
//! initramfs), in the emulated KVM host. Two boots:
//!
//! - `balloon-api`: a 512 MiB guest configured through the API fills 320 MiB of tmpfs and frees
//!   it; inflating 256 MiB (PATCH /balloon) must lower pvm's resident memory by at least
//!   200 MiB; statistics (GET /balloon/statistics) must change about once per second at
//!   stats_polling_interval_s 1; with a 400 MiB target the guest then needs 150 MiB more, which
//!   deflate_on_oom gives it without the OOM killer. Then, on the same boot, free page
//!   hinting: the target goes back to 0, the guest frees its 120 MiB, and a hinting run
//!   (PATCH /balloon/hinting/start) must end acknowledged (host_cmd DONE, guest_cmd STOP) and
//!   lower pvm's resident memory by at least 80 MiB.
//! - `balloon-reporting`: `--balloon free_page_reporting=on` on the command line; memory the
//!   guest fills and frees goes back to the host with no target at all.

mod common;

use common::{Batch, Kernel, Scenario, add_initramfs_files, assets, guest_initramfs};

/// The guest's /init: the balloon driver, a tmpfs to fill, and `rest`.
fn initramfs(rest: &str) -> Vec<u8> {
    let init = format!(
        "insmod /virtio_balloon.ko && echo balloon-loaded\n\
         mount -t tmpfs -o size=480m tmpfs /mnt\n\
         avail() {{ sed -n 's/^MemAvailable: *\\([0-9]*\\) kB/\\1/p' /proc/meminfo; }}\n\
         {rest}"
    );
    let mut image = guest_initramfs(&init, Kernel::DebianBzImage);
    let module = assets().join("debian/extra-modules/virtio_balloon.ko");
    let data =
        std::fs::read(&module).unwrap_or_else(|e| panic!("cannot read {}: {e}", module.display()));
    add_initramfs_files(
        &mut image,
        &[("virtio_balloon.ko".to_string(), 0o644, data)],
    );
    image
}

/// Host-side shell helpers: `api` (one call, printed as `api METHOD PATH: EXIT ANSWER`),
/// `field NAME` (a number from GET /balloon/statistics), `rss` (pvm's VmRSS in KiB),
/// `wait_for FILE TEXT SECS`, `now` (seconds since boot).
const HELPERS: &str = r#"sock=api.sock
api() { r=$(pvm-api-client $sock "$@"); echo "api $1 $2: $? $r"; }
field() { v=$(pvm-api-client $sock GET /balloon/statistics | sed -n "s/.*\"$1\":\([0-9]*\).*/\1/p"); echo ${v:-0}; }
rss() { awk '/^VmRSS:/ { print $2 }' /proc/$pvm/status; }
now() { cut -d' ' -f1 /proc/uptime; }
wait_for() {
    i=0
    while ! grep -q "$2" "$1" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt $(($3 * 10)) ]; then echo "wait-timeout: no '$2' in $1"; return 1; fi
        usleep 100000
    done
}
wait_actual() {
    i=0
    while [ "$(field actual_mib)" -lt $1 ]; do
        i=$((i + 1))
        if [ $i -gt $(($2 * 5)) ]; then echo "actual-timeout $1"; return 1; fi
        usleep 200000
    done
}
"#;

fn api_scenario() -> Scenario {
    let guest = "dd if=/dev/zero of=/mnt/fill bs=1M count=320 2>/dev/null && echo guest-filled\n\
         rm /mnt/fill\n\
         echo guest-freed\n\
         i=0\n\
         while [ $(avail) -gt 81920 ] && [ $i -lt 1200 ]; do i=$((i + 1)); usleep 100000; done\n\
         echo \"guest-avail-kib $(avail)\"\n\
         dd if=/dev/zero of=/mnt/oom bs=1M count=120 2>/dev/null && echo oom-fill-ok || echo oom-fill-failed\n\
         echo \"guest-oom-kills $(sed -n 's/^oom_kill //p' /proc/vmstat)\"\n\
         echo oom-done\n\
         i=0\n\
         while [ $(avail) -lt 256000 ] && [ $i -lt 600 ]; do i=$((i + 1)); usleep 100000; done\n\
         rm /mnt/oom\n\
         echo \"hint-freed $(avail)\"\n\
         sleep 1000\n";
    let boot = r#"{"kernel_image_path": "{kernel}", "initrd_path": "initrd.cpio", "boot_args": "console=ttyS0 reboot=k panic=1 quiet init_on_alloc=0"}"#;
    let host = format!(
        r#"{HELPERS}echo "t-start $(now)"
rm -f $sock
pvm --api-sock $sock --id balloon > pvm.log 2>&1 &
pvm=$!
api PUT /machine-config '{{"vcpu_count": 1, "mem_size_mib": 512}}'
api PUT /boot-source '{boot}'
api PUT /balloon '{{"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_hinting": true}}'
api GET /balloon
api PUT /actions '{{"action_type": "InstanceStart"}}'
wait_for pvm.log guest-freed 150
echo "t-freed $(now)"
usleep 500000
before=$(rss)
api PATCH /balloon '{{"amount_mib": 256}}'
wait_actual 256 60
after=$(rss)
echo "rss-kib $before $after"
echo "t-inflated $(now)"
start=$(now); changes=0; last=x
while :; do
    v=$(field minor_faults)
    [ "$v" != "$last" ] && changes=$((changes + 1)); last=$v
    t=$(now)
    [ $(echo "$start $t" | awk '{{ print ($2 - $1 >= 5) }}') = 1 ] && break
    usleep 100000
done
echo "$start $t $changes" | awk '{{ printf "stats-changes %d in %.1f s\n", $3 - 1, $2 - $1 }}'
api GET /balloon/statistics
api PATCH /balloon/statistics '{{"stats_polling_interval_s": 2}}'
echo "t-stats $(now)"
api PATCH /balloon '{{"amount_mib": 400}}'
wait_actual 380 60 && echo "balloon-near-400 $(now)"
wait_for pvm.log oom-done 120
echo "t-oom-done $(now)"
api GET /balloon/statistics
api GET /balloon
api PATCH /balloon '{{"amount_mib": 0}}'
wait_for pvm.log hint-freed 90
echo "t-hint-freed $(now)"
usleep 500000
before=$(rss)
api GET /balloon/hinting/status
api PATCH /balloon/hinting/start '{{}}'
i=0
until s=$(pvm-api-client $sock GET /balloon/hinting/status) && \
    echo "$s" | grep -q '"host_cmd":1' && echo "$s" | grep -q '"guest_cmd":0'; do
    i=$((i + 1))
    if [ $i -gt 300 ]; then echo "hint-timeout"; break; fi
    usleep 200000
done
api GET /balloon/hinting/status
echo "hint-rss-kib $before $(rss)"
echo "t-hinted $(now)"
api PUT /actions '{{"action_type": "SendCtrlAltDel"}}'
wait $pvm
rc=$?
cat pvm.log
echo "pvm-exit $rc"
"#
    );
    Scenario::new("balloon-api")
        .kernel(Kernel::DebianBzImage)
        .file("initrd.cpio", initramfs(guest))
        .program("pvm-api-client")
        .script(&host)
        .timeout(240)
}

fn reporting_scenario() -> Scenario {
    let guest = "dd if=/dev/zero of=/mnt/fill bs=1M count=100 2>/dev/null && echo rep-filled\n\
         sleep 2\n\
         rm /mnt/fill\n\
         echo rep-freed\n\
         sleep 60\n";
    let host = format!(
        r#"{HELPERS}echo "t-start $(now)"
{{pvm}} > pvm.log 2>&1 &
pvm=$!
wait_for pvm.log rep-filled 150
echo "t-filled $(now)"
usleep 500000
filled=$(rss)
wait_for pvm.log rep-freed 30
i=0
while [ $((filled - $(rss))) -lt 71680 ] && [ $i -lt 200 ]; do i=$((i + 1)); usleep 100000; done
echo "reported-kib $filled $(rss)"
echo "t-reported $(now)"
kill $pvm
wait $pvm
cat pvm.log
"#
    );
    Scenario::new("balloon-reporting")
        .kernel(Kernel::DebianBzImage)
        .file("initrd.cpio", initramfs(guest))
        .args([
            "--kernel",
            "{kernel}",
            "--initrd",
            "initrd.cpio",
            "--mem",
            "512M",
        ])
        .args(["--cmdline", "quiet", "--balloon", "free_page_reporting=on"])
        .script(&host)
        .timeout(180)
}

fn scenarios() -> Vec<Scenario> {
    vec![api_scenario(), reporting_scenario()]
}

static BATCH: Batch = Batch::new(scenarios);

/// The two numbers after `prefix` in the scenario's output.
fn pair(name: &str, prefix: &str) -> (i64, i64) {
    let outcome = BATCH.outcome(name);
    let line = outcome
        .console
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .unwrap_or_else(|| {
            outcome.dump();
            panic!("{name}: no '{prefix}' line")
        });
    let mut numbers = line
        .split_whitespace()
        .map(|w| w.parse::<i64>().unwrap_or(-1));
    (numbers.next().unwrap_or(-1), numbers.next().unwrap_or(-1))
}

#[test]
fn configured_through_the_api() {
    let outcome = BATCH.outcome("balloon-api");
    outcome.assert_contains("balloon-loaded");
    outcome.assert_contains("api PUT /balloon: 0 204");
    outcome.assert_contains(r#""amount_mib":0,"deflate_on_oom":true,"stats_polling_interval_s":1"#);
    outcome.assert_contains("api PATCH /balloon/statistics: 0 204");
    outcome
        .assert_contains(r#""amount_mib":400,"deflate_on_oom":true,"stats_polling_interval_s":2"#);
    outcome.assert_contains("pvm-exit 0");
}

#[test]
fn inflating_256_mib_lowers_rss_by_200_mib() {
    let (before, after) = pair("balloon-api", "rss-kib ");
    let outcome = BATCH.outcome("balloon-api");
    outcome.assert_lacks("actual-timeout");
    if before - after < 200 * 1024 {
        outcome.dump();
        panic!("pvm's RSS went from {before} KiB to {after} KiB");
    }
}

#[test]
fn statistics_arrive_every_interval() {
    let outcome = BATCH.outcome("balloon-api");
    let line = outcome.word_after("stats-changes ");
    let changes: u32 = line.parse().unwrap_or(0);
    // Five seconds at one report per second; TCG's timing is loose.
    if !(3..=7).contains(&changes) {
        outcome.dump();
        panic!("{changes} statistics updates in about 5 s at an interval of 1 s");
    }
    for field in [
        "\"free_memory\":",
        "\"total_memory\":",
        "\"available_memory\":",
        "\"target_mib\":256",
    ] {
        outcome.assert_contains(field);
    }
}

#[test]
fn the_guest_deflates_on_oom() {
    let outcome = BATCH.outcome("balloon-api");
    outcome.assert_contains("balloon-near-400");
    outcome.assert_contains("oom-fill-ok");
    outcome.assert_contains("guest-oom-kills 0");
    // The last statistics: the target stays, the balloon gave up what the guest needed.
    let last = outcome
        .console
        .lines()
        .rfind(|l| l.starts_with("api GET /balloon/statistics"))
        .unwrap_or_default()
        .to_string();
    let actual: u32 = last
        .split("\"actual_mib\":")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX);
    if !last.contains("\"target_mib\":400") || actual > 340 {
        outcome.dump();
        panic!("after the OOM fill: {last}");
    }
}

#[test]
fn a_hinting_run_returns_freed_memory() {
    let outcome = BATCH.outcome("balloon-api");
    outcome.assert_contains(r#"api GET /balloon/hinting/status: 0 200 {"host_cmd":0}"#);
    outcome.assert_contains("api PATCH /balloon/hinting/start: 0 204");
    outcome.assert_lacks("hint-timeout");
    outcome.assert_contains(r#"{"guest_cmd":0,"host_cmd":1}"#);
    let (before, after) = pair("balloon-api", "hint-rss-kib ");
    if before - after < 80 * 1024 {
        outcome.dump();
        panic!("pvm's RSS went from {before} KiB to {after} KiB over a hinting run");
    }
}

#[test]
fn free_page_reporting_returns_freed_memory() {
    let (filled, now) = pair("balloon-reporting", "reported-kib ");
    if filled - now < 70 * 1024 {
        BATCH.outcome("balloon-reporting").dump();
        panic!("pvm's RSS went from {filled} KiB to {now} KiB after the guest freed 100 MiB");
    }
}
