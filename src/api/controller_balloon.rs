//! The balloon's API actions on the main thread: before boot they change the configuration,
//! once the VM runs `PATCH /balloon` sets the device's target (and raises its configuration
//! change interrupt, so the driver reads it) and `PATCH /balloon/statistics` its interval.

use pvm_virtio::balloon::PAGES_PER_MIB;

use super::super::models::Balloon;
use super::{Action, Controller, Response, RunningVm, json};

/// The answer when no balloon was configured.
pub const NO_BALLOON: &str =
    "Balloon device error: the VM has no balloon device (PUT /balloon before boot, or --balloon)";

impl Controller {
    /// The balloon as configured: the API's, else the one `--balloon` gave.
    pub(super) fn balloon(&self) -> Option<Balloon> {
        self.fc
            .balloon
            .clone()
            .or_else(|| self.base.balloon.as_ref().map(Balloon::from_config))
    }

    /// `GET /balloon`.
    pub(super) fn get_balloon(&self) -> Response {
        match self.balloon() {
            Some(balloon) => json(&balloon),
            None => Response::fault(NO_BALLOON),
        }
    }

    /// The balloon with a PATCH applied; None when there is no balloon.
    pub(super) fn patched_balloon(&self, action: &Action) -> Option<Balloon> {
        let mut balloon = self.balloon()?;
        match action {
            Action::PatchBalloon(update) => balloon.amount_mib = update.amount_mib,
            Action::PatchBalloonStats(update) => {
                balloon.stats_polling_interval_s = update.stats_polling_interval_s;
            }
            _ => {}
        }
        Some(balloon)
    }

    /// `PATCH /balloon` or `/balloon/statistics` on the running VM.
    pub(super) fn patch_running_balloon(
        &mut self,
        action: &Action,
        vm: &mut RunningVm<'_, '_>,
    ) -> Response {
        let (Some(handle), Some(balloon)) =
            (self.limiters.balloon.clone(), self.patched_balloon(action))
        else {
            return Response::fault(NO_BALLOON);
        };
        match action {
            Action::PatchBalloon(update) => {
                let mem = self.fc.machine(&self.base).mem_size_mib << 20;
                let config = match balloon.to_config() {
                    Ok(config) => config,
                    Err(e) => return Response::fault(&e.to_string()),
                };
                if let Err(e) = crate::balloon::check_fits(&config, mem) {
                    return Response::fault(&format!("Balloon device error: {e}"));
                }
                handle.set_target_pages(update.amount_mib.saturating_mul(PAGES_PER_MIB));
                let notified = vm.device("balloon").map(|d| d.notify_config_change());
                if let Some(Err(e)) = notified {
                    return Response::fault(&format!(
                        "Balloon device error: the target is set but the guest was not told: {e}"
                    ));
                }
                log::info!("API: balloon target {} MiB", update.amount_mib);
            }
            Action::PatchBalloonStats(update) => {
                if let Err(e) = handle.set_stats_interval(update.stats_polling_interval_s) {
                    return Response::fault(&format!("Balloon device error: {e}"));
                }
            }
            _ => return Response::fault(NO_BALLOON),
        }
        self.fc.balloon = Some(balloon);
        Response::no_content()
    }

    /// `PATCH /balloon/hinting/start|stop` and `GET /balloon/hinting/status` on the running VM.
    /// Start and stop change the command id in the device's configuration space and raise its
    /// configuration change interrupt, so the driver reads it.
    pub(super) fn balloon_hinting(&self, action: &Action, vm: &mut RunningVm<'_, '_>) -> Response {
        let Some(handle) = &self.limiters.balloon else {
            return Response::fault(NO_BALLOON);
        };
        let changed = match action {
            Action::StartBalloonHinting(cmd) => {
                handle.start_hinting(cmd.acknowledge_on_stop).map(|id| {
                    log::info!("API: balloon hinting run {id} started");
                })
            }
            Action::StopBalloonHinting => handle.stop_hinting(),
            Action::GetBalloonHintingStatus => {
                return match handle.hinting_status() {
                    Ok(status) => json(&crate::balloon::hinting_json(&status)),
                    Err(e) => Response::fault(&format!("Balloon device error: {e}")),
                };
            }
            _ => return Response::fault(NO_BALLOON),
        };
        if let Err(e) = changed {
            return Response::fault(&format!("Balloon device error: {e}"));
        }
        if let Some(Err(e)) = vm.device("balloon").map(|d| d.notify_config_change()) {
            return Response::fault(&format!(
                "Balloon device error: the hinting command is set but the guest was not told: {e}"
            ));
        }
        Response::no_content()
    }

    /// `GET /balloon/statistics` on the running VM.
    pub(super) fn balloon_stats(&self) -> Response {
        match &self.limiters.balloon {
            Some(handle) if handle.stats_interval_s() > 0 => {
                json(&crate::balloon::stats_json(handle))
            }
            Some(_) => Response::fault(
                "Balloon device error: statistics were not enabled when the balloon was \
                 configured (stats_polling_interval_s 0)",
            ),
            None => Response::fault(NO_BALLOON),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::api::models::tests::base;
    use crate::api::models::{
        BalloonStartCmd, BalloonStatsUpdate, BalloonUpdate, FcConfig, MachineConfigUpdate,
    };
    use crate::exit::EndSignal;
    use crate::vm::{Pauser, RunControl};

    fn balloon(amount_mib: u32, stats: u32) -> Balloon {
        Balloon {
            amount_mib,
            deflate_on_oom: true,
            stats_polling_interval_s: stats,
            free_page_hinting: false,
            free_page_reporting: true,
        }
    }

    fn fault(response: &Response) -> String {
        assert_eq!(response.status, 400, "{response:?}");
        response.body.clone().unwrap_or_default()
    }

    #[test]
    fn preboot_put_patch_and_get() {
        let mut c = Controller::new("vm".into(), base(), FcConfig::default());
        let (r, _) = c.preboot(Action::GetBalloon);
        assert!(fault(&r).contains("no balloon device"));
        let (r, _) = c.preboot(Action::PatchBalloon(BalloonUpdate { amount_mib: 1 }));
        assert!(fault(&r).contains("no balloon device"));
        // 128 MiB guest: a larger target is refused and changes nothing.
        let (r, _) = c.preboot(Action::PutBalloon(balloon(129, 0)));
        assert!(fault(&r).contains("amount_mib 129"), "{r:?}");
        assert!(c.fc.balloon.is_none());
        // Hinting commands need the running VM.
        let (r, _) = c.preboot(Action::StopBalloonHinting);
        assert_eq!(r.status, 400);
        let (r, _) = c.preboot(Action::PutBalloon(balloon(64, 0)));
        assert_eq!(r.status, 204);
        let (r, _) = c.preboot(Action::PatchBalloon(BalloonUpdate { amount_mib: 32 }));
        assert_eq!(r.status, 204);
        let (r, _) = c.preboot(Action::PatchBalloonStats(BalloonStatsUpdate {
            stats_polling_interval_s: 2,
        }));
        assert_eq!(r.status, 204);
        let (r, _) = c.preboot(Action::GetBalloon);
        let body = r.body.unwrap();
        assert!(
            body.contains(r#""amount_mib":32"#) && body.contains(r#""stats_polling_interval_s":2"#)
        );
        let (r, _) = c.preboot(Action::GetVmConfig);
        assert!(r.body.unwrap().contains(r#""balloon":{"amount_mib":32"#));
        let config = c.vm_config().unwrap().balloon.unwrap();
        assert_eq!((config.amount_mib, config.stats_interval_s), (32, 2));
        // Shrinking the guest below the target is refused.
        let (r, _) = c.preboot(Action::PatchMachineConfig(MachineConfigUpdate {
            mem_size_mib: Some(16),
            ..Default::default()
        }));
        assert_eq!(r.status, 400);
        let (r, _) = c.preboot(Action::GetBalloonStats);
        assert_eq!(r.status, 400);
    }

    #[test]
    fn the_config_file_section() {
        let config = |json: &str| {
            let fc: FcConfig = serde_json::from_str(json).unwrap();
            fc.to_vm_config(&base()).map(|vm| vm.balloon)
        };
        let on = r#"{"balloon": {"amount_mib": 16, "deflate_on_oom": false,
                     "free_page_reporting": true}}"#;
        assert_eq!(
            config(on).unwrap(),
            Some(pvm_virtio::BalloonConfig {
                amount_mib: 16,
                free_page_reporting: true,
                ..Default::default()
            })
        );
        assert_eq!(config(r#"{"balloon": null}"#).unwrap(), None);
        let hinting = r#"{"balloon": {"amount_mib": 1, "deflate_on_oom": false,
                          "free_page_hinting": true}}"#;
        assert_eq!(
            config(hinting).unwrap(),
            Some(pvm_virtio::BalloonConfig {
                amount_mib: 1,
                free_page_hinting: true,
                ..Default::default()
            })
        );
        let too_big = r#"{"balloon": {"amount_mib": 4096, "deflate_on_oom": true}}"#;
        assert!(config(too_big).is_err());
    }

    /// What a RunningVm borrows, for runtime actions without a VM.
    struct NoVm {
        end: Arc<EndSignal>,
        keyboard: std::sync::Mutex<crate::devices::i8042::I8042>,
        pauser: Pauser<'static>,
    }

    impl NoVm {
        fn new() -> Self {
            let end = Arc::new(EndSignal::new().unwrap());
            let irq = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let keyboard = std::sync::Mutex::new(crate::devices::i8042::I8042::new(
                end.clone(),
                crate::devices::IrqTrigger(irq),
            ));
            let pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
            NoVm {
                end,
                keyboard,
                pauser,
            }
        }

        fn vm(&mut self) -> RunningVm<'_, 'static> {
            RunningVm {
                end: &self.end,
                keyboard: &self.keyboard,
                pauser: &mut self.pauser,
            }
        }
    }

    /// A started controller with `config` put, and its balloon device's handle.
    fn started(config: Balloon) -> (Controller, pvm_virtio::BalloonHandle) {
        let mut c = Controller::new("vm".into(), base(), FcConfig::default());
        let (r, _) = c.preboot(Action::PutBalloon(config));
        assert_eq!(r.status, 204);
        let device = pvm_virtio::Balloon::new(c.vm_config().unwrap().balloon.unwrap()).unwrap();
        let handle = device.handle();
        c.set_limiters(crate::virtio_devices::DeviceLimiters {
            balloon: Some(handle.clone()),
            ..Default::default()
        });
        c.set_started();
        (c, handle)
    }

    #[test]
    fn runtime_patch_sets_the_target_and_interval() {
        let (mut c, handle) = started(balloon(8, 1));
        let mut no_vm = NoVm::new();
        let mut vm = no_vm.vm();
        let r = c.runtime(
            Action::PatchBalloon(BalloonUpdate { amount_mib: 100 }),
            &mut vm,
        );
        assert_eq!(r.status, 204);
        assert_eq!(handle.target_pages(), 100 * PAGES_PER_MIB);
        let r = c.runtime(
            Action::PatchBalloon(BalloonUpdate { amount_mib: 200 }),
            &mut vm,
        );
        assert!(fault(&r).contains("amount_mib 200"));
        assert_eq!(handle.target_pages(), 100 * PAGES_PER_MIB);
        let r = c.runtime(
            Action::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 0,
            }),
            &mut vm,
        );
        assert!(fault(&r).contains("cannot be turned off"));
        let r = c.runtime(
            Action::PatchBalloonStats(BalloonStatsUpdate {
                stats_polling_interval_s: 7,
            }),
            &mut vm,
        );
        assert_eq!(r.status, 204);
        let r = c.runtime(Action::GetBalloonStats, &mut vm);
        let body = r.body.unwrap();
        assert!(
            body.contains(r#""target_mib":100"#) && body.contains(r#""actual_pages":0"#),
            "{body}"
        );
        let r = c.runtime(Action::GetBalloon, &mut vm);
        let body = r.body.unwrap();
        assert!(
            body.contains(r#""amount_mib":100"#)
                && body.contains(r#""stats_polling_interval_s":7"#)
        );
        let r = c.runtime(Action::PutBalloon(balloon(1, 1)), &mut vm);
        assert_eq!(r.status, 400);
    }

    #[test]
    fn runtime_hinting_start_status_stop() {
        let mut config = balloon(8, 0);
        config.free_page_hinting = true;
        let (mut c, handle) = started(config);
        let mut no_vm = NoVm::new();
        let mut vm = no_vm.vm();
        let status = |c: &mut Controller, vm: &mut RunningVm<'_, '_>| {
            c.runtime(Action::GetBalloonHintingStatus, vm).body.unwrap()
        };
        assert_eq!(status(&mut c, &mut vm), r#"{"host_cmd":0}"#);
        let start = Action::StartBalloonHinting(BalloonStartCmd {
            acknowledge_on_stop: false,
        });
        assert_eq!(c.runtime(start.clone(), &mut vm).status, 204);
        assert_eq!(status(&mut c, &mut vm), r#"{"host_cmd":2}"#);
        assert_eq!(c.runtime(start, &mut vm).status, 204);
        assert_eq!(handle.hinting_status().unwrap().host_cmd, 3);
        assert_eq!(c.runtime(Action::StopBalloonHinting, &mut vm).status, 204);
        assert_eq!(status(&mut c, &mut vm), r#"{"host_cmd":1}"#);
        let r = c.runtime(Action::GetBalloon, &mut vm);
        assert!(r.body.unwrap().contains(r#""free_page_hinting":true"#));

        // A balloon without hinting refuses all three, by name.
        let plain = pvm_virtio::Balloon::new(pvm_virtio::BalloonConfig::default()).unwrap();
        c.set_limiters(crate::virtio_devices::DeviceLimiters {
            balloon: Some(plain.handle()),
            ..Default::default()
        });
        for action in [
            Action::StartBalloonHinting(BalloonStartCmd {
                acknowledge_on_stop: true,
            }),
            Action::StopBalloonHinting,
            Action::GetBalloonHintingStatus,
        ] {
            let r = c.runtime(action, &mut vm);
            assert!(
                fault(&r).contains("free page hinting was not enabled"),
                "{r:?}"
            );
        }
        // And a VM without a balloon says so.
        c.set_limiters(crate::virtio_devices::DeviceLimiters::default());
        let r = c.runtime(Action::GetBalloonHintingStatus, &mut vm);
        assert!(fault(&r).contains("no balloon device"));
    }
}
