use super::*;
use crate::api::models::tests::base;
use crate::api::models::{BootSource, MachineConfigUpdate};
use crate::exit::EndSignal;
use crate::vm::{Pauser, RunControl};
use std::sync::Arc;

fn controller() -> Controller {
    Controller::new("vm1".to_string(), base(), FcConfig::default())
}

fn fault_of(response: &Response) -> String {
    assert_eq!(response.status, 400, "{response:?}");
    response.body.clone().unwrap()
}

#[test]
fn preboot_configuration_and_refusals() {
    let mut c = controller();
    let (info, _) = c.preboot(Action::GetInstanceInfo);
    assert_eq!(
        info.body.unwrap(),
        r#"{"id":"vm1","state":"Not started","vmm_version":"0.1.0","app_name":"pvm"}"#
    );
    let (start, vm) = c.preboot(Action::InstanceStart);
    assert!(vm.is_none());
    assert!(fault_of(&start).contains("PUT /boot-source first"));
    // A refused PUT changes nothing.
    let (put, _) = c.preboot(Action::PutBootSource(BootSource {
        kernel_image_path: "/nonexistent".into(),
        initrd_path: None,
        boot_args: None,
    }));
    assert!(fault_of(&put).contains("/nonexistent"));
    assert!(c.fc.boot_source.is_none());
    let (patch, _) = c.preboot(Action::PatchMachineConfig(MachineConfigUpdate {
        mem_size_mib: Some(256),
        ..Default::default()
    }));
    assert_eq!(patch.status, 204);
    let (bad, _) = c.preboot(Action::PatchMachineConfig(MachineConfigUpdate {
        vcpu_count: Some(0),
        ..Default::default()
    }));
    assert!(fault_of(&bad).contains("vcpu_count"));
    let (machine, _) = c.preboot(Action::GetMachineConfig);
    assert!(machine.body.unwrap().contains(r#""mem_size_mib":256"#));
    for action in [
        Action::SendCtrlAltDel,
        Action::FlushMetrics,
        Action::Pause,
        Action::Resume,
    ] {
        let (response, _) = c.preboot(action);
        assert!(fault_of(&response).contains(BEFORE_START));
    }
    assert!(!c.started());
}

#[test]
fn runtime_refuses_preboot_calls_and_ends_on_ctrl_alt_del() {
    let mut c = controller();
    c.set_started();
    let end = EndSignal::new().unwrap();
    let mut pauser = Pauser::new(Arc::new(RunControl::default()), &[], &[]);
    let mut vm = RunningVm {
        end: &end,
        pauser: &mut pauser,
    };
    let info = c.runtime(Action::GetInstanceInfo, &mut vm);
    assert!(info.body.unwrap().contains(r#""state":"Running""#));
    for action in [
        Action::InstanceStart,
        Action::PutEntropy(Default::default()),
        Action::PatchMachineConfig(MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        }),
    ] {
        assert!(fault_of(&c.runtime(action, &mut vm)).contains(AFTER_START));
    }
    assert!(fault_of(&c.runtime(Action::FlushMetrics, &mut vm)).contains("not configured"));
    // PATCH /vm: paused, reported, idempotent, resumed.
    assert_eq!(c.runtime(Action::Pause, &mut vm).status, 204);
    assert_eq!(c.runtime(Action::Pause, &mut vm).status, 204);
    let info = c.runtime(Action::GetInstanceInfo, &mut vm);
    assert!(info.body.unwrap().contains(r#""state":"Paused""#));
    assert_eq!(c.runtime(Action::Resume, &mut vm).status, 204);
    assert!(!vm.is_paused());
    assert_eq!(end.outcome(), None);
    assert_eq!(c.runtime(Action::SendCtrlAltDel, &mut vm).status, 204);
    assert_eq!(end.outcome(), Some(Outcome::Reboot));
}
