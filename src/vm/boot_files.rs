//! The kernel and initrd to boot: the files named by --kernel/--initrd, or the guest's own
//! kernel found on the first --disk and kept in memory files.

use std::fs::File;
use std::path::PathBuf;

use super::{Error, io_err};
use crate::boot;
use crate::config::VmConfig;
use crate::logger;

/// The kernel (and initrd) to boot, opened, with the names messages use for them.
#[derive(Debug)]
pub struct BootFiles {
    pub kernel: (File, PathBuf),
    pub initrd: Option<(File, PathBuf)>,
    /// root= for a kernel found on the first disk.
    pub root: Option<String>,
}

fn open_initrd(path: &PathBuf) -> Result<(File, PathBuf), Error> {
    let file = File::open(path).map_err(|source| {
        Error::Boot(boot::Error::OpenInitrd {
            path: path.clone(),
            source,
        })
    })?;
    Ok((file, path.clone()))
}

/// Opens --kernel/--initrd, or finds the guest's own kernel on the first --disk.
pub fn boot_files(config: &VmConfig) -> Result<BootFiles, Error> {
    if let Some(kernel) = &config.kernel {
        boot::probe_kernel(kernel)?;
        let initrd = config.initrd.as_ref().map(open_initrd).transpose()?;
        let file = File::open(kernel).map_err(|source| {
            Error::Boot(boot::Error::OpenKernel {
                path: kernel.clone(),
                source,
            })
        })?;
        return Ok(BootFiles {
            kernel: (file, kernel.clone()),
            initrd,
            root: None,
        });
    }
    let disk = config.disks.first().ok_or(Error::NoKernel)?;
    let found = boot::disk::find_kernel(&disk.path)?;
    let name = |inner: &str| PathBuf::from(format!("{}:{inner}", disk.path.display()));
    let io = io_err("keeping the disk's kernel in memory");
    let kernel = (
        crate::memfd::with_bytes(c"kernel", &found.kernel).map_err(&io)?,
        name(&found.kernel_name),
    );
    let initrd = match (&config.initrd, &found.initrd) {
        (Some(path), _) => Some(open_initrd(path)?),
        (None, Some((initrd_name, bytes))) => Some((
            crate::memfd::with_bytes(c"initrd", bytes).map_err(&io)?,
            name(initrd_name),
        )),
        (None, None) => None,
    };
    let root = found.root_device();
    logger::to_stderr(&format!(
        "pvm: booting {} (initrd: {}), root={root}\n",
        kernel.1.display(),
        initrd
            .as_ref()
            .map(|i| i.1.display().to_string())
            .unwrap_or_else(|| "none".to_string())
    ));
    Ok(BootFiles {
        kernel,
        initrd,
        root: Some(root),
    })
}
