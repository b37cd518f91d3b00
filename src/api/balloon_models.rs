//! Firecracker's balloon bodies: `PUT /balloon`, `PATCH /balloon`, `PATCH /balloon/statistics`,
//! `PATCH /balloon/hinting/start|stop`.

use pvm_virtio::BalloonConfig;
use serde::{Deserialize, Serialize};

use super::mapping::ConfigError;

/// `PUT /balloon` and the config file's `balloon` section; also what `GET /balloon` returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`: a new target.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`: a new statistics interval.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u32,
}

/// `PATCH /balloon/hinting/start`: with `acknowledge_on_stop` (the default) the device ends
/// the run by itself once the guest has hinted all it can.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    #[serde(default = "acknowledge_by_default")]
    pub acknowledge_on_stop: bool,
}

fn acknowledge_by_default() -> bool {
    true
}

/// `PATCH /balloon/hinting/stop` takes no fields: `{}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStopCmd {}

impl Balloon {
    /// The body that describes `config` (a `--balloon` flag's).
    pub fn from_config(config: &BalloonConfig) -> Self {
        Balloon {
            amount_mib: config.amount_mib,
            deflate_on_oom: config.deflate_on_oom,
            stats_polling_interval_s: config.stats_interval_s,
            free_page_hinting: config.free_page_hinting,
            free_page_reporting: config.free_page_reporting,
        }
    }

    /// The device this body asks for.
    pub fn to_config(&self) -> Result<BalloonConfig, ConfigError> {
        Ok(BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting,
            free_page_hinting: self.free_page_hinting,
        })
    }
}
