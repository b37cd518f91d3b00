//! `GET /pvm/info`, a pvm extension of the Firecracker API: what `pvm list` and `pvm status`
//! show of a VM. The VM builds it ([`PvmInfo::of`]); the subcommands read it back.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::config::{DiskSpec, VmConfig};

/// One VM, as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PvmInfo {
    pub id: String,
    pub pid: i32,
    /// "Not started", "Running" or "Paused" (as GET / says).
    pub state: String,
    pub vcpus: u8,
    pub mem_mib: u64,
    /// Seconds since the VM started (0 before).
    pub uptime_s: u64,
    /// Disk image paths, and vhost-user=SOCKET for backend-served disks.
    pub disks: Vec<String>,
    /// Tap names, and vhost-user=SOCKET for backend-served nets.
    pub taps: Vec<String>,
    /// The console's Unix socket (--console socket), if any.
    pub console_socket: Option<String>,
    /// Console output dropped because nobody read it (with a console socket).
    #[serde(default)]
    pub console_dropped_bytes: Option<u64>,
}

/// How the `--cloud-init` seed shows among the disks: it has no path.
pub const CLOUD_INIT_DISK: &str = "cloud-init(ro)";

/// `pvm list`'s columns.
pub const HEADER: [&str; 8] = [
    "ID", "PID", "STATE", "VCPUS", "MEMORY", "UPTIME", "DISKS", "TAPS",
];

impl PvmInfo {
    /// The info of the VM `config` describes, in `state`, started at `started`.
    pub fn of(id: &str, state: &str, config: &VmConfig, started: Option<Instant>) -> Self {
        let vhost_user = |p: &std::path::PathBuf| format!("vhost-user={}", p.display());
        PvmInfo {
            id: id.to_string(),
            pid: std::process::id() as i32,
            state: state.to_string(),
            vcpus: config.cpus,
            mem_mib: config.mem_bytes >> 20,
            uptime_s: started.map_or(0, |t| t.elapsed().as_secs()),
            disks: config
                .disks
                .iter()
                .map(|d: &DiskSpec| d.path.display().to_string())
                .chain(config.vhost_user_disks.iter().map(vhost_user))
                .chain(
                    config
                        .cloud_init
                        .iter()
                        .map(|_| CLOUD_INIT_DISK.to_string()),
                )
                .collect(),
            taps: config
                .taps
                .iter()
                .map(|t| t.name.clone())
                .chain(config.vhost_user_nets.iter().map(vhost_user))
                .collect(),
            console_socket: config
                .console_socket
                .as_ref()
                .map(|s| s.path.display().to_string()),
            console_dropped_bytes: crate::devices::console_socket::dropped_total(),
        }
    }

    /// This VM's row of `pvm list`.
    pub fn row(&self) -> [String; 8] {
        let list = |items: &[String]| {
            if items.is_empty() {
                "-".to_string()
            } else {
                items.join(",")
            }
        };
        [
            self.id.clone(),
            self.pid.to_string(),
            self.state.clone(),
            self.vcpus.to_string(),
            format!("{}M", self.mem_mib),
            duration(self.uptime_s),
            list(&self.disks),
            list(&self.taps),
        ]
    }

    /// `pvm status`: one "name: value" line each.
    pub fn describe(&self) -> String {
        let row = self.row();
        let mut text = String::new();
        for (name, value) in HEADER.iter().zip(row.iter()) {
            text.push_str(&format!("{}: {}\n", name.to_lowercase(), clean(value)));
        }
        text.push_str(&format!(
            "console: {}\n",
            clean(self.console_socket.as_deref().unwrap_or("-"))
        ));
        if let Some(dropped) = self.console_dropped_bytes {
            text.push_str(&format!("console dropped: {dropped} bytes\n"));
        }
        text
    }
}

/// 42s, 3m05s, 2h03m, 4d02h.
fn duration(seconds: u64) -> String {
    let (m, h, d) = (seconds / 60, seconds / 3600, seconds / 86400);
    match (d, h, m) {
        (0, 0, 0) => format!("{seconds}s"),
        (0, 0, _) => format!("{m}m{:02}s", seconds % 60),
        (0, _, _) => format!("{h}h{:02}m", m % 60),
        _ => format!("{d}d{:02}h", h % 24),
    }
}

/// `text` with its control characters shown as '?'.
fn clean(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Rows as columns padded to their widest cell; no trailing spaces. Control characters a VM
/// put in its answer are shown as '?', so a fake VM cannot drive the terminal.
pub fn table(rows: &[[String; 8]]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|r| r.iter().map(|c| clean(c)).collect())
        .collect();
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut text = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            line.push_str(cell);
            let pad = widths[i].saturating_sub(cell.chars().count());
            line.extend(std::iter::repeat_n(' ', pad));
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_the_table() {
        assert_eq!(duration(42), "42s");
        assert_eq!(duration(185), "3m05s");
        assert_eq!(duration(7380), "2h03m");
        assert_eq!(duration(86400 * 4 + 7200), "4d02h");
        let info = PvmInfo {
            id: "web\x1b[2J".to_string(),
            pid: 7,
            state: "Running".to_string(),
            vcpus: 2,
            mem_mib: 512,
            uptime_s: 3,
            disks: vec!["/a.img".to_string(), "/b.img".to_string()],
            taps: vec![],
            console_socket: None,
            console_dropped_bytes: None,
        };
        let text = table(&[HEADER.map(str::to_string), info.row()]);
        assert_eq!(
            text,
            "ID       PID  STATE    VCPUS  MEMORY  UPTIME  DISKS          TAPS\n\
             web?[2J  7    Running  2      512M    3s      /a.img,/b.img  -\n"
        );
        assert!(
            info.describe()
                .contains("disks: /a.img,/b.img\ntaps: -\nconsole: -\n")
        );
    }
}
