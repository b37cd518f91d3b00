//! Firecracker's balloon bodies: `PUT /balloon`, `PATCH /balloon`, `PATCH /balloon/statistics`.

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

impl Balloon {
    /// The body that describes `config` (a `--balloon` flag's).
    pub fn from_config(config: &BalloonConfig) -> Self {
        Balloon {
            amount_mib: config.amount_mib,
            deflate_on_oom: config.deflate_on_oom,
            stats_polling_interval_s: config.stats_interval_s,
            free_page_hinting: false,
            free_page_reporting: config.free_page_reporting,
        }
    }

    /// The device this body asks for; free page hinting is refused by name.
    pub fn to_config(&self) -> Result<BalloonConfig, ConfigError> {
        if self.free_page_hinting {
            return Err(ConfigError::Refused {
                category: "Balloon device",
                field: "free_page_hinting".to_string(),
                why: "pvm does not offer free page hinting (it pays off only for live migration \
                      and snapshots, which pvm lacks); use free_page_reporting",
            });
        }
        Ok(BalloonConfig {
            amount_mib: self.amount_mib,
            deflate_on_oom: self.deflate_on_oom,
            stats_interval_s: self.stats_polling_interval_s,
            free_page_reporting: self.free_page_reporting,
        })
    }
}
