//! Opening /dev/kvm with errors a user can act on, and telling what kind of KVM this host has.

use std::path::Path;

use kvm_ioctls::{Cap, Kvm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "/dev/kvm does not exist: this host has no KVM (load kvm_intel or kvm_amd, or enable nested virtualisation)"
    )]
    Missing,
    #[error("/dev/kvm: permission denied (add this user to the 'kvm' group or run as root)")]
    Permission,
    #[error("cannot open /dev/kvm: {0}")]
    Open(kvm_ioctls::Error),
    #[error("KVM API version {0} is not the supported version 12")]
    ApiVersion(i32),
    #[error("this KVM lacks {0:?}, which pvm needs")]
    MissingCap(Cap),
}

/// The vendor module behind /dev/kvm, as /sys/module shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmFlavour {
    Intel,
    Amd,
    /// kvm_pvm: pagetable-based virtualisation; only PVM-enabled guest kernels run at speed.
    Pvm,
    Unknown,
}

pub fn flavour_from(sys_module: &Path) -> KvmFlavour {
    let has = |name: &str| sys_module.join(name).exists();
    if has("kvm_intel") {
        KvmFlavour::Intel
    } else if has("kvm_amd") {
        KvmFlavour::Amd
    } else if has("kvm_pvm") {
        KvmFlavour::Pvm
    } else {
        KvmFlavour::Unknown
    }
}

/// Opens /dev/kvm and checks the API version and the capabilities pvm relies on.
pub fn open() -> Result<(Kvm, KvmFlavour), Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::Missing,
        libc::EACCES | libc::EPERM => Error::Permission,
        _ => Error::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != 12 {
        return Err(Error::ApiVersion(version));
    }
    for cap in [
        Cap::Irqchip,
        Cap::Ioeventfd,
        Cap::Irqfd,
        Cap::Pit2,
        Cap::UserMemory,
        Cap::ImmediateExit,
    ] {
        if !kvm.check_extension(cap) {
            return Err(Error::MissingCap(cap));
        }
    }
    let flavour = flavour_from(Path::new("/sys/module"));
    if flavour == KvmFlavour::Pvm {
        log::warn!(
            "this host's KVM is kvm_pvm: only PVM-enabled guest kernels run at speed; \
             other kernels are emulated instruction by instruction and may not boot"
        );
    }
    Ok((kvm, flavour))
}

/// For unit tests that need a real VM: /dev/kvm, or None (said on stderr) where this host
/// has none, and the test returns early.
#[cfg(test)]
pub(crate) fn kvm_for_tests() -> Option<Kvm> {
    let kvm = Kvm::new().ok();
    if kvm.is_none() {
        eprintln!("no usable /dev/kvm: test skipped");
    }
    kvm
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavour_follows_sys_module() {
        let dir = std::env::temp_dir().join(format!("pvm-sysmod-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("kvm")).unwrap();
        assert_eq!(flavour_from(&dir), KvmFlavour::Unknown);
        std::fs::create_dir_all(dir.join("kvm_pvm")).unwrap();
        assert_eq!(flavour_from(&dir), KvmFlavour::Pvm);
        std::fs::create_dir_all(dir.join("kvm_amd")).unwrap();
        assert_eq!(flavour_from(&dir), KvmFlavour::Amd);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
