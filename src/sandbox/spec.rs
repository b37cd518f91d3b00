//! What the host tells pvm's guest init (crate::sandbox::guest_init), as a file in the
//! initramfs: NUL-terminated `key=value` records, so arguments may hold any byte but NUL (which
//! no argv can hold anyway).

/// Where the records are in the initramfs.
pub const SPEC_PATH: &str = "pvm/sandbox";
/// Where the module files are in the initramfs.
pub const MODULE_DIR: &str = "pvm/modules";

/// The guest's instructions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GuestSpec {
    /// Module files in the initramfs, in load order.
    pub modules: Vec<String>,
    /// The virtio-fs tag of the host's root.
    pub tag: String,
    /// The command and its arguments; empty: the interactive shell.
    pub command: Vec<String>,
    /// Whether pvm's stdin and stdout are terminals: if not, the guest's console echoes
    /// nothing and passes output through unchanged (no "\r\n"), so piped output is the
    /// command's own.
    pub tty: bool,
    /// The host terminal's size, for the guest's console.
    pub rows: u16,
    pub cols: u16,
    /// The host's $TERM.
    pub term: Option<String>,
}

impl GuestSpec {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut put = |key: &str, value: &str| {
            out.extend_from_slice(key.as_bytes());
            out.push(b'=');
            out.extend_from_slice(value.as_bytes());
            out.push(0);
        };
        for module in &self.modules {
            put("module", module);
        }
        put("tag", &self.tag);
        for arg in &self.command {
            put("arg", arg);
        }
        put("tty", if self.tty { "1" } else { "0" });
        put("rows", &self.rows.to_string());
        put("cols", &self.cols.to_string());
        if let Some(term) = &self.term {
            put("term", term);
        }
        out
    }

    /// Reads the records back; unknown keys, records without '=' and bad numbers are skipped
    /// (the init then runs with defaults rather than not at all).
    pub fn decode(bytes: &[u8]) -> GuestSpec {
        let mut spec = GuestSpec::default();
        for record in bytes.split(|&b| b == 0) {
            let text = String::from_utf8_lossy(record);
            let Some((key, value)) = text.split_once('=') else {
                continue;
            };
            let value = value.to_string();
            match key {
                "module" => spec.modules.push(value),
                "tag" => spec.tag = value,
                "arg" => spec.command.push(value),
                "tty" => spec.tty = value == "1",
                "rows" => spec.rows = value.parse().unwrap_or(0),
                "cols" => spec.cols = value.parse().unwrap_or(0),
                "term" => spec.term = Some(value),
                _ => {}
            }
        }
        spec
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_arguments_with_any_text() {
        let spec = GuestSpec {
            modules: vec!["pvm/modules/00-fuse.ko".into()],
            tag: "hostfs".into(),
            command: vec![
                "sh".into(),
                "-c".into(),
                "echo a=b\n'x y'".into(),
                String::new(),
            ],
            tty: true,
            rows: 50,
            cols: 132,
            term: Some("xterm-256color".into()),
        };
        assert_eq!(GuestSpec::decode(&spec.encode()), spec);
    }

    #[test]
    fn hostile_records_give_defaults_not_panics() {
        let spec = GuestSpec::decode(b"rows=99999999\0cols=-1\0junk\0\xff\xfe=1\0tty=yes\0=\0\0");
        assert_eq!(spec, GuestSpec::default());
        assert_eq!(GuestSpec::decode(b"arg=\xffx").command, ["\u{fffd}x"]);
    }
}
