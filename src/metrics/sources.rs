//! The VM's counters that metrics and `--stats` both read: vCPU exits by reason, each disk's
//! host I/O errors, each tap's frame counters, and for taps whose queues kernel vhost-net
//! carries (which pvm never sees) the tap's own kernel statistics.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use pvm_virtio::{DiskErrors, NetCounters};

use crate::vcpu::ExitStats;

/// One named value of a metrics group.
pub type Field = (&'static str, u64);

/// A group of the metrics line: its key ("vcpu", "net_tap0") and its fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub fields: Vec<Field>,
}

/// A tap's kernel statistics, from `/proc/self/net/dev` (opened before the sandbox and re-read
/// in place), counted from when it was opened (the tap may be older than the VM). procfs shows
/// the reading thread's network namespace, where pvm's taps live; /sys/class/net shows the
/// namespace that mounted /sys, which is not pvm's when pvm runs in a namespace of its own. A
/// tap that is not listed leaves its fields missing, never zero.
#[derive(Debug)]
pub struct TapStats {
    name: String,
    file: Option<File>,
    /// The counts at opening, in the order of [`FIELDS`]; None when the tap was not listed.
    start: Option<[u64; 4]>,
}

/// The metrics fields, in the guest's direction, and the column of /proc/net/dev each comes
/// from: the tap's transmit counts are what the guest received, and the other way round.
const FIELDS: [(&str, usize); 4] = [
    ("rx_packets_count", TX_PACKETS),
    ("rx_bytes_count", TX_BYTES),
    ("tx_packets_count", RX_PACKETS),
    ("tx_bytes_count", RX_BYTES),
];
/// Columns after "name:" in /proc/net/dev: receive bytes, packets, errs, drop, fifo, frame,
/// compressed, multicast, then transmit bytes, packets, ...
const RX_BYTES: usize = 0;
const RX_PACKETS: usize = 1;
const TX_BYTES: usize = 8;
const TX_PACKETS: usize = 9;

/// The /proc/net/dev line of interface `name`, as its numbers.
fn parse_net_dev(text: &str, name: &str) -> Option<Vec<u64>> {
    text.lines().find_map(|line| {
        let (iface, counts) = line.split_once(':')?;
        (iface.trim() == name).then(|| {
            counts
                .split_whitespace()
                .map_while(|n| n.parse().ok())
                .collect()
        })
    })
}

impl TapStats {
    /// Opens the statistics of tap `name`; logged when the tap is not there.
    pub fn open(name: &str) -> TapStats {
        let file = File::open("/proc/self/net/dev")
            .inspect_err(|e| {
                log::warn!("metrics: /proc/self/net/dev: {e}; tap {name}'s counts left out")
            })
            .ok();
        let mut stats = TapStats {
            name: name.to_string(),
            file,
            start: None,
        };
        stats.start = stats.counts();
        if stats.file.is_some() && stats.start.is_none() {
            log::warn!("metrics: tap {name} is not in /proc/net/dev; its counts are left out");
        }
        stats
    }

    /// The tap's counts now, in the order of [`FIELDS`].
    fn counts(&self) -> Option<[u64; 4]> {
        let file = self.file.as_ref()?;
        // Many interfaces fit; a longer file is cut, and a tap past the cut is left out.
        let mut buf = vec![0u8; 64 * 1024];
        let n = file.read_at(&mut buf, 0).ok()?;
        let text = std::str::from_utf8(&buf[..n]).ok()?;
        let row = parse_net_dev(text, &self.name)?;
        let mut counts = [0u64; 4];
        for (count, &(_, column)) in counts.iter_mut().zip(&FIELDS) {
            *count = *row.get(column)?;
        }
        Some(counts)
    }

    /// The fields, counted since opening; none when the counts cannot be read.
    pub fn fields(&self) -> Vec<Field> {
        let (Some(start), Some(now)) = (self.start, self.counts()) else {
            return Vec::new();
        };
        FIELDS
            .iter()
            .zip(start.iter().zip(now))
            .map(|(&(field, _), (start, now))| (field, now.saturating_sub(*start)))
            .collect()
    }
}

/// Where a tap's counters come from.
#[derive(Debug)]
pub enum NetSource {
    /// pvm's own worker moves the frames: its counters, one set per queue pair.
    InProcess(Vec<Arc<NetCounters>>),
    /// Kernel vhost-net moves them: the tap's kernel statistics.
    Kernel(TapStats),
}

/// Every counter of a VM, shared by the metrics file and `--stats`.
#[derive(Debug)]
pub struct Sources {
    pub exits: Arc<ExitStats>,
    /// Disks by id ("disk0", ...) with their path and host I/O error count.
    pub disks: Vec<(String, String, Arc<DiskErrors>)>,
    /// Taps by name (the interface id).
    pub nets: Vec<(String, NetSource)>,
    /// Whether the seccomp filters are in (a violation ends pvm, so the count is 0 until then).
    pub seccomp: bool,
    /// The balloon device's counters, if the VM has one.
    pub balloon: Option<pvm_virtio::BalloonHandle>,
}

/// The in-process counters of a tap under Firecracker's names where the meaning is the same.
pub fn net_fields(counters: &NetCounters) -> Vec<Field> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    vec![
        ("rx_bytes_count", get(&counters.rx_bytes)),
        ("rx_packets_count", get(&counters.rx_frames)),
        ("tx_bytes_count", get(&counters.tx_bytes)),
        ("tx_packets_count", get(&counters.tx_frames)),
        ("tap_read_fails", get(&counters.rx_errors)),
        ("tap_write_fails", get(&counters.tx_errors)),
        ("tx_malformed_frames", get(&counters.tx_malformed)),
        ("rx_frames_too_large", get(&counters.rx_dropped)),
    ]
}

impl Sources {
    /// The vCPU exit counts under Firecracker's names, then pvm's own reasons.
    fn vcpu_fields(&self) -> Vec<Field> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let e = &self.exits;
        vec![
            ("exit_io_in", get(&e.io_in)),
            ("exit_io_out", get(&e.io_out)),
            ("exit_mmio_read", get(&e.mmio_read)),
            ("exit_mmio_write", get(&e.mmio_write)),
            ("exit_interrupted", get(&e.interrupted)),
            ("exit_other", get(&e.other)),
        ]
    }

    /// Each tap's fields, summed over its queue pairs.
    pub fn net_groups(&self) -> Vec<(String, Vec<Field>)> {
        self.nets
            .iter()
            .map(|(tap, source)| {
                let fields = match source {
                    NetSource::InProcess(pairs) => net_fields(&NetCounters::total(pairs)),
                    NetSource::Kernel(stats) => stats.fields(),
                };
                (tap.clone(), fields)
            })
            .collect()
    }

    /// The counter groups (totals since the start; the writer turns them into deltas).
    pub fn groups(&self) -> Vec<Group> {
        let mut groups = vec![Group {
            name: "vcpu".to_string(),
            fields: self.vcpu_fields(),
        }];
        let disks: Vec<(String, Vec<Field>)> = self
            .disks
            .iter()
            .map(|(id, _, errors)| (id.clone(), vec![("execute_fails", errors.count())]))
            .collect();
        push_devices(&mut groups, "block", disks);
        push_devices(&mut groups, "net", self.net_groups());
        if let Some(balloon) = &self.balloon {
            groups.push(Group {
                name: "balloon".to_string(),
                fields: crate::balloon::metrics_fields(balloon),
            });
        }
        if self.seccomp {
            groups.push(Group {
                name: "seccomp".to_string(),
                fields: vec![("num_faults", 0)],
            });
        }
        groups
    }
}

/// Adds `kind`'s aggregate group (when there are devices) and one group per device,
/// "KIND_ID". The aggregate has only the fields every device has: a sum over some devices
/// would look like a total and be wrong.
fn push_devices(groups: &mut Vec<Group>, kind: &str, devices: Vec<(String, Vec<Field>)>) {
    let Some((_, first)) = devices.first() else {
        return;
    };
    let fields = first
        .iter()
        .filter_map(|&(name, _)| {
            let values: Option<Vec<u64>> = devices
                .iter()
                .map(|(_, fields)| fields.iter().find(|f| f.0 == name).map(|f| f.1))
                .collect();
            values.map(|v| (name, v.iter().fold(0u64, |a, b| a.wrapping_add(*b))))
        })
        .collect();
    groups.push(Group {
        name: kind.to_string(),
        fields,
    });
    for (id, fields) in devices {
        groups.push(Group {
            name: format!("{kind}_{id}"),
            fields,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aggregates_keep_only_fields_every_device_has() {
        let mut groups = Vec::new();
        push_devices(
            &mut groups,
            "net",
            vec![
                (
                    "tap0".to_string(),
                    vec![("rx_bytes_count", 5), ("tap_read_fails", 1)],
                ),
                ("tap1".to_string(), vec![("rx_bytes_count", 7)]),
            ],
        );
        assert_eq!(groups.len(), 3);
        assert_eq!(groups[0].name, "net");
        assert_eq!(groups[0].fields, vec![("rx_bytes_count", 12)]);
        assert_eq!(groups[1].name, "net_tap0");
        assert_eq!(groups[2].fields, vec![("rx_bytes_count", 7)]);
        let mut none = Vec::new();
        push_devices(&mut none, "block", Vec::new());
        assert!(none.is_empty());
    }

    #[test]
    fn net_dev_lines_are_found_by_interface_name() {
        let text = "Inter-|   Receive                            |  Transmit\n \
                    face |bytes    packets errs drop fifo frame compressed multicast|bytes ...\n    \
                    lo:     100       2    0    0    0     0          0         0      100       2    0    0    0     0       0          0\n  \
                    tap10: 5000 40 0 0 0 0 0 0 7000 50 0 0 0 0 0 0\n";
        let tap = parse_net_dev(text, "tap10").unwrap();
        assert_eq!((tap[RX_BYTES], tap[RX_PACKETS]), (5000, 40));
        assert_eq!((tap[TX_BYTES], tap[TX_PACKETS]), (7000, 50));
        // "tap1" is not "tap10".
        assert!(parse_net_dev(text, "tap1").is_none());
    }

    #[test]
    fn a_missing_tap_leaves_its_kernel_fields_out_rather_than_zero() {
        let stats = TapStats::open("pvm-no-such-tap");
        assert!(stats.fields().is_empty());
        // The loopback device always has statistics: the fields are read and named.
        let lo = TapStats::open("lo");
        let names: Vec<&str> = lo.fields().iter().map(|f| f.0).collect();
        assert_eq!(
            names,
            [
                "rx_packets_count",
                "rx_bytes_count",
                "tx_packets_count",
                "tx_bytes_count"
            ]
        );
    }

    #[test]
    fn a_vhost_net_tap_reports_kernel_counts_and_the_aggregate_only_shared_fields() {
        let sources = Sources {
            exits: Arc::new(ExitStats::default()),
            disks: Vec::new(),
            nets: vec![
                ("lo".to_string(), NetSource::Kernel(TapStats::open("lo"))),
                (
                    "tap1".to_string(),
                    NetSource::InProcess(vec![Arc::new(NetCounters::default())]),
                ),
            ],
            seccomp: false,
            balloon: None,
        };
        let groups = sources.groups();
        let names: Vec<&str> = groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, ["vcpu", "net", "net_lo", "net_tap1"]);
        let fields = |i: usize| -> Vec<&str> { groups[i].fields.iter().map(|f| f.0).collect() };
        let kernel = [
            "rx_packets_count",
            "rx_bytes_count",
            "tx_packets_count",
            "tx_bytes_count",
        ];
        assert_eq!(fields(2), kernel);
        assert_eq!(fields(3).len(), 8);
        // The aggregate keeps the four counts both have, in the first device's order.
        assert_eq!(fields(1), kernel);
    }
}
