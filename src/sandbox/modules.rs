//! Which kernel modules the sandbox guest must load, in load order, from a host module tree
//! (`/lib/modules/RELEASE`): each wanted module's dependencies from modules.dep first, modules
//! that modules.builtin says are built into the kernel skipped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// The modules the sandbox needs: the virtio transports, the share (FUSE + virtio-fs) and the
/// overlay; `required` ones must exist as a module or be built in.
pub const WANTED: &[(&str, bool)] = &[
    ("virtio_pci", true),
    ("virtio_mmio", false),
    ("virtio_console", false),
    ("fuse", true),
    ("virtiofs", true),
    ("overlay", true),
    // The guest's panics reach pvm (exit code 3) instead of hanging the VM.
    ("pvpanic_mmio", false),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "module {module} is compressed and {config} says its kernel cannot decompress modules \
         (CONFIG_MODULE_DECOMPRESS is not set); pvm hands modules to the kernel as they are"
    )]
    CannotDecompress { module: String, config: PathBuf },
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "module {name} is neither in {dir}/modules.dep nor in modules.builtin: this kernel \
         cannot share the host's files (it needs {name})"
    )]
    Missing { name: String, dir: PathBuf },
    #[error("{dir}/modules.dep: module {name} depends on itself through {through}")]
    Cycle {
        name: String,
        through: String,
        dir: PathBuf,
    },
}

/// A module's name as the kernel knows it: the file name without `.ko[.xz|.zst|.gz]`, with
/// '-' as '_'.
pub fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// A parsed module tree: each module's path (relative to the tree) and its dependencies' paths.
#[derive(Debug, Default)]
pub struct Tree {
    dir: PathBuf,
    deps: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

impl Tree {
    /// Reads `dir`/modules.dep and `dir`/modules.builtin (missing builtin list: none built in).
    pub fn read(dir: &Path) -> Result<Tree, Error> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| Error::Read { path, source })
        };
        let dep = read("modules.dep")?;
        let builtin = match read("modules.builtin") {
            Ok(text) => text,
            Err(Error::Read { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                String::new()
            }
            Err(e) => return Err(e),
        };
        Ok(Tree::parse(dir, &dep, &builtin))
    }

    /// Parses the two files' text; malformed lines are skipped (depmod writes neither).
    pub fn parse(dir: &Path, dep: &str, builtin: &str) -> Tree {
        let mut deps = HashMap::new();
        for line in dep.lines() {
            let Some((module, rest)) = line.split_once(':') else {
                continue;
            };
            let module = module.trim();
            if module.is_empty() {
                continue;
            }
            let list = rest.split_whitespace().map(str::to_string).collect();
            deps.insert(module_name(module), (module.to_string(), list));
        }
        let builtin = builtin
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(module_name)
            .collect();
        Tree {
            dir: dir.to_path_buf(),
            deps,
            builtin,
        }
    }

    /// The module files (relative to the tree) to load for `wanted`, dependencies first, each
    /// once. A wanted module that is absent is an error if required, skipped otherwise.
    pub fn load_order(&self, wanted: &[(&str, bool)]) -> Result<Vec<String>, Error> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for &(name, required) in wanted {
            let name = module_name(name);
            if self.builtin.contains(&name) || done.contains(&name) {
                continue;
            }
            let Some((path, deps)) = self.deps.get(&name) else {
                if required {
                    return Err(Error::Missing {
                        name,
                        dir: self.dir.clone(),
                    });
                }
                continue;
            };
            // modules.dep lists every dependency, transitively, the deepest last: loading them
            // back to front puts each after what it needs.
            for dep in deps.iter().rev() {
                let dep_name = module_name(dep);
                if dep_name == name {
                    return Err(Error::Cycle {
                        name,
                        through: dep.clone(),
                        dir: self.dir.clone(),
                    });
                }
                if done.insert(dep_name) {
                    order.push(dep.clone());
                }
            }
            done.insert(name);
            order.push(path.clone());
        }
        Ok(order)
    }
}

/// Whether `path` names a compressed module file.
pub fn is_compressed(path: &str) -> bool {
    [".xz", ".zst", ".gz"].iter().any(|ext| path.ends_with(ext))
}

/// Refuses compressed modules for a kernel whose config (`config`'s text, from
/// /boot/config-RELEASE) lacks the loader's decompressor; without a config the guest finds out.
pub fn check_decompress(order: &[String], config: Option<(&Path, &str)>) -> Result<(), Error> {
    let Some((path, text)) = config else {
        return Ok(());
    };
    let can = text
        .lines()
        .any(|l| l.trim() == "CONFIG_MODULE_DECOMPRESS=y");
    match order.iter().find(|m| is_compressed(m)) {
        Some(module) if !can => Err(Error::CannotDecompress {
            module: module.clone(),
            config: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Shaped like Debian's cloud kernel's tree (virtio core as modules, fuse/overlay too).
    const DEP: &str = "\
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/virtio/virtio_pci_modern_dev.ko:
kernel/drivers/virtio/virtio_pci_legacy_dev.ko:
kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio_pci_legacy_dev.ko \
kernel/drivers/virtio/virtio_pci_modern_dev.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/fuse/fuse.ko:
kernel/fs/fuse/virtiofs.ko.zst: kernel/fs/fuse/fuse.ko kernel/drivers/virtio/virtio.ko \
kernel/drivers/virtio/virtio_ring.ko
kernel/fs/overlayfs/overlay.ko.xz:
kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
garbage line without a colon
: nothing
";

    fn tree(builtin: &str) -> Tree {
        Tree::parse(Path::new("/lib/modules/6.1.0-test"), DEP, builtin)
    }

    #[test]
    fn dependencies_come_first_each_once_builtins_skipped() {
        let order = tree("kernel/drivers/virtio/virtio_mmio.ko\n")
            .load_order(WANTED)
            .unwrap();
        assert_eq!(
            order,
            [
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/drivers/virtio/virtio_pci_modern_dev.ko",
                "kernel/drivers/virtio/virtio_pci_legacy_dev.ko",
                "kernel/drivers/virtio/virtio_pci.ko",
                "kernel/fs/fuse/fuse.ko",
                "kernel/fs/fuse/virtiofs.ko.zst",
                "kernel/fs/overlayfs/overlay.ko.xz",
                "kernel/drivers/misc/pvpanic/pvpanic.ko",
                "kernel/drivers/misc/pvpanic/pvpanic-mmio.ko",
            ]
        );
    }

    #[test]
    fn built_in_modules_need_no_file_and_missing_required_ones_are_named() {
        let all_builtin = "kernel/drivers/virtio/virtio_pci.ko\nkernel/fs/fuse/fuse.ko\n\
                           kernel/fs/fuse/virtiofs.ko\nkernel/fs/overlayfs/overlay.ko\n";
        let t = Tree::parse(Path::new("/m"), "", all_builtin);
        assert!(t.load_order(WANTED).unwrap().is_empty());
        let t = Tree::parse(Path::new("/m"), "kernel/fs/fuse/fuse.ko:\n", "");
        let err = t.load_order(WANTED).unwrap_err().to_string();
        assert!(
            err.contains("module virtio_pci") && err.contains("/m/modules.dep"),
            "{err}"
        );
    }

    #[test]
    fn a_module_that_depends_on_itself_is_refused() {
        let t = Tree::parse(Path::new("/m"), "a/fuse.ko: b/x.ko a/fuse.ko\n", "");
        assert!(matches!(
            t.load_order(&[("fuse", true)]),
            Err(Error::Cycle { .. })
        ));
    }

    #[test]
    fn compressed_modules_need_the_kernels_decompressor() {
        let plain = vec!["kernel/fs/fuse/fuse.ko".to_string()];
        let packed = vec![
            "a/virtio.ko".to_string(),
            "kernel/fs/fuse/fuse.ko.zst".to_string(),
        ];
        let without = (
            Path::new("/boot/config-x"),
            "# CONFIG_MODULE_DECOMPRESS is not set\n",
        );
        let with = (Path::new("/boot/config-x"), "CONFIG_MODULE_DECOMPRESS=y\n");
        check_decompress(&plain, Some(without)).unwrap();
        check_decompress(&packed, Some(with)).unwrap();
        check_decompress(&packed, None).unwrap();
        let err = check_decompress(&packed, Some(without))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("fuse.ko.zst") && err.contains("/boot/config-x"),
            "{err}"
        );
        assert!(is_compressed("x.ko.xz") && is_compressed("x.ko.gz") && !is_compressed("x.ko"));
    }

    #[test]
    fn names_are_normalised() {
        assert_eq!(module_name("kernel/x/pvpanic-mmio.ko.zst"), "pvpanic_mmio");
        assert_eq!(module_name("virtio_pci.ko"), "virtio_pci");
        assert_eq!(module_name("overlay"), "overlay");
    }

    #[test]
    fn a_missing_tree_names_the_file() {
        let err = Tree::read(Path::new("/nonexistent/lib/modules/x")).unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent/lib/modules/x/modules.dep")
        );
    }
}
