//! The balloon device from pvm's side: `--balloon` on the command line, the JSON the API's
//! `GET /balloon/statistics` returns, and the `balloon` metrics group. The device itself is
//! [`pvm_virtio::balloon`].

use std::sync::atomic::{AtomicU64, Ordering};

use pvm_virtio::BalloonConfig;
use pvm_virtio::balloon::{BalloonHandle, HintingStatus, PAGES_PER_MIB};

/// Why a `--balloon` value was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonArgError {
    #[error(
        "unknown balloon option '{0}' (known: amount_mib=N, deflate_on_oom=on|off, \
         stats_interval=S, free_page_reporting=on|off, free_page_hinting=on|off)"
    )]
    Option(String),
    #[error("{key}={value}: use a whole number")]
    Number { key: &'static str, value: String },
    #[error("{key}={value}: use on or off")]
    OnOff { key: &'static str, value: String },
}

/// The largest balloon target in MiB whose page count fits the device's 32-bit num_pages.
pub const MAX_AMOUNT_MIB: u32 = u32::MAX / PAGES_PER_MIB;

/// Parses `amount_mib=N[,deflate_on_oom=on|off][,stats_interval=S][,free_page_reporting=on|off]`
/// `[,free_page_hinting=on|off]` (every option may be left out).
pub fn parse_balloon(text: &str) -> Result<BalloonConfig, BalloonArgError> {
    let mut config = BalloonConfig::default();
    for option in text.split(',').filter(|o| !o.is_empty()) {
        let Some((key, value)) = option.split_once('=') else {
            return Err(BalloonArgError::Option(option.to_string()));
        };
        let number = |key: &'static str| {
            value.parse::<u32>().map_err(|_| BalloonArgError::Number {
                key,
                value: value.to_string(),
            })
        };
        let on_off = |key: &'static str| {
            pvm_common::cli::parse_on_off(value).map_err(|_| BalloonArgError::OnOff {
                key,
                value: value.to_string(),
            })
        };
        match key {
            "amount_mib" => config.amount_mib = number("amount_mib")?,
            "deflate_on_oom" => config.deflate_on_oom = on_off("deflate_on_oom")?,
            "stats_interval" => config.stats_interval_s = number("stats_interval")?,
            "free_page_reporting" => config.free_page_reporting = on_off("free_page_reporting")?,
            "free_page_hinting" => config.free_page_hinting = on_off("free_page_hinting")?,
            _ => return Err(BalloonArgError::Option(option.to_string())),
        }
    }
    Ok(config)
}

/// Why a balloon configuration does not fit the VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BalloonFitError {
    #[error("amount_mib {amount} is larger than the guest's {mem} MiB of memory")]
    TooLarge { amount: u32, mem: u64 },
}

/// Checks that the balloon's target fits a guest of `mem_bytes`.
pub fn check_fits(config: &BalloonConfig, mem_bytes: u64) -> Result<(), BalloonFitError> {
    let mem = mem_bytes >> 20;
    if u64::from(config.amount_mib) > mem {
        return Err(BalloonFitError::TooLarge {
            amount: config.amount_mib,
            mem,
        });
    }
    Ok(())
}

/// `GET /balloon/statistics`: Firecracker's fields, the guest's statistics among them as far
/// as the guest reported them.
pub fn stats_json(handle: &BalloonHandle) -> serde_json::Value {
    let (target, actual) = (handle.target_pages(), handle.actual_pages());
    let mut body = serde_json::json!({
        "target_pages": target,
        "actual_pages": actual,
        "target_mib": target / PAGES_PER_MIB,
        "actual_mib": actual / PAGES_PER_MIB,
    });
    if let Some(object) = body.as_object_mut() {
        for (name, value) in handle.stats().named() {
            object.insert(name.to_string(), value.into());
        }
    }
    body
}

/// `GET /balloon/hinting/status`: Firecracker's fields; `guest_cmd` only once the driver sent
/// a command id.
pub fn hinting_json(status: &HintingStatus) -> serde_json::Value {
    let mut body = serde_json::json!({ "host_cmd": status.host_cmd });
    if let (Some(object), Some(guest)) = (body.as_object_mut(), status.guest_cmd) {
        object.insert("guest_cmd".to_string(), guest.into());
    }
    body
}

/// The `balloon` metrics group's fields.
pub fn metrics_fields(handle: &BalloonHandle) -> Vec<(&'static str, u64)> {
    let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
    let c = handle.counters();
    vec![
        ("inflated_pages", get(&c.inflated_pages)),
        ("deflated_pages", get(&c.deflated_pages)),
        ("reported_bytes", get(&c.reported_bytes)),
        ("refused_pages", get(&c.refused_pages)),
        ("stats_updates_count", get(&c.stats_reports)),
        ("discard_fails", get(&c.discard_failures)),
        ("free_page_hint_freed", get(&c.hinted_bytes)),
        ("refused_hints", get(&c.refused_hints)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_options() {
        let c = parse_balloon(
            "amount_mib=64,deflate_on_oom=on,stats_interval=2,free_page_reporting=on,\
             free_page_hinting=on",
        )
        .unwrap();
        assert_eq!(
            c,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_interval_s: 2,
                free_page_reporting: true,
                free_page_hinting: true,
            }
        );
        assert_eq!(parse_balloon("").unwrap(), BalloonConfig::default());
        assert_eq!(
            parse_balloon("free_page_hinting=off").unwrap(),
            BalloonConfig::default()
        );
        for bad in [
            "free_page_hinting=yes",
            "amount_mib=-1",
            "amount_mib=1e3",
            "amount_mib=99999999999",
            "deflate_on_oom=yes",
            "stats_interval=",
            "size=5",
            "amount_mib",
        ] {
            let e = parse_balloon(bad).unwrap_err().to_string();
            assert!(e.contains(bad.split('=').next().unwrap()), "{bad}: {e}");
        }
    }

    #[test]
    fn the_flag_reaches_the_vm_config() {
        let parse = |args: &[&str]| {
            let all = ["pvm"].iter().chain(args).map(std::ffi::OsString::from);
            crate::cli::parse(all)
        };
        let config = parse(&[
            "--mem",
            "256M",
            "--balloon",
            "amount_mib=128,stats_interval=1",
        ])
        .unwrap()
        .balloon
        .unwrap();
        assert_eq!((config.amount_mib, config.stats_interval_s), (128, 1));
        assert!(parse(&[]).unwrap().balloon.is_none());
        for (args, want) in [
            (&["--mem", "256M", "--balloon", "amount_mib=512"][..], "512"),
            (&["--balloon", "bogus=1"][..], "bogus"),
        ] {
            match parse(args) {
                Err(crate::cli::CliExit::Message(2, text)) => {
                    assert!(text.contains("--balloon") && text.contains(want), "{text}")
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn the_target_must_fit_the_guest() {
        let c = BalloonConfig {
            amount_mib: 512,
            ..Default::default()
        };
        assert!(check_fits(&c, 512 << 20).is_ok());
        let e = check_fits(&c, 256 << 20).unwrap_err().to_string();
        assert!(e.contains("512") && e.contains("256"), "{e}");
    }
}
