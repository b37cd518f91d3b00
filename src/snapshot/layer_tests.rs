//! Layering: a Diff's pages land on the base, its holes leave the base alone, and files that
//! do not belong together are refused with one line naming why.

use std::os::unix::fs::FileExt;

use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::snapshot::MemoryLineage;
use crate::snapshot::file::write;
use crate::snapshot::memory_file::tests::test_ram;
use crate::snapshot::memory_file::{file_bytes, write_diff};
use crate::snapshot::sample::sample;

const MEM: u64 = 32 << 20;

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir = std::env::temp_dir().join(format!("pvm-layer-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }
    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn state(dir: &Dir, name: &str, kind: SnapshotKind, id: u64, parent: Option<u64>) -> PathBuf {
    let mut snapshot = sample();
    snapshot.description.mem_bytes = MEM;
    snapshot.memory = MemoryLineage { kind, id, parent };
    let path = dir.path(name);
    write(&path, &snapshot).unwrap();
    path
}

/// A file of the guest's size whose every page holds its page number's low byte + 1.
fn base_file(path: &Path) {
    let file = File::create(path).unwrap();
    let mut page = vec![0u8; 4096];
    for n in 0..file_bytes(MEM) / 4096 {
        page.fill((n as u8).wrapping_add(1));
        file.write_all_at(&page, n * 4096).unwrap();
    }
}

fn spec(dir: &Dir, diff: &Path, base: &Path) -> LayerSpec {
    LayerSpec {
        diff_snapshot: diff.to_path_buf(),
        diff_mem: dir.path("diff.mem"),
        base_snapshot: base.to_path_buf(),
        base_mem: dir.path("base.mem"),
    }
}

#[test]
fn a_diff_layers_its_pages_onto_its_base_and_leaves_the_rest() {
    let dir = Dir::new("ok");
    let base = state(&dir, "base.snap", SnapshotKind::Full, 10, None);
    let diff = state(&dir, "diff.snap", SnapshotKind::Diff, 11, Some(10));
    base_file(&dir.path("base.mem"));
    let mem = test_ram(MEM);
    mem.write_slice(&[0xab; 4096], GuestAddress(0x5000))
        .unwrap();
    let mut dirty = vec![0u64; (MEM / 4096 / 64) as usize];
    dirty[0] = 1 << 5 | 1 << 7; // page 7 stays zero in RAM: a zeroed page
    write_diff(&dir.path("diff.mem"), &mem, &[dirty]).unwrap();
    let copied = layer(&spec(&dir, &diff, &base)).unwrap();
    assert_eq!(copied, 2 * 4096);
    let data = std::fs::read(dir.path("base.mem")).unwrap();
    assert_eq!(data.len() as u64, MEM);
    assert!(data[0x5000..0x6000].iter().all(|&b| b == 0xab));
    assert!(
        data[0x7000..0x8000].iter().all(|&b| b == 0),
        "the zeroed page"
    );
    assert!(
        data[0x6000..0x7000].iter().all(|&b| b == 7),
        "untouched base page"
    );
    assert!(data[0x10_0000..0x10_1000].iter().all(|&b| b == 1));
}

#[test]
fn files_that_do_not_belong_together_are_refused() {
    let dir = Dir::new("refused");
    let full = state(&dir, "full.snap", SnapshotKind::Full, 10, None);
    let other = state(&dir, "other.snap", SnapshotKind::Full, 99, None);
    let diff = state(&dir, "diff.snap", SnapshotKind::Diff, 11, Some(10));
    let complete = state(&dir, "complete.snap", SnapshotKind::Diff, 12, None);
    base_file(&dir.path("base.mem"));
    base_file(&dir.path("diff.mem"));
    let e = |s: LayerSpec| {
        let e = layer(&s).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        e
    };
    assert!(e(spec(&dir, &full, &full)).contains("a Full snapshot"));
    assert!(e(spec(&dir, &complete, &full)).contains("every page dirty"));
    let msg = e(spec(&dir, &diff, &other));
    assert!(
        msg.contains("over snapshot 000000000000000a, not over") && msg.contains("other.snap"),
        "{msg}"
    );
    // Another guest size.
    let mut big = sample();
    big.description.mem_bytes = 2 * MEM;
    big.memory = MemoryLineage {
        kind: SnapshotKind::Full,
        id: 10,
        parent: None,
    };
    write(&dir.path("big.snap"), &big).unwrap();
    let msg = e(spec(&dir, &diff, &dir.path("big.snap")));
    assert!(msg.contains("bytes of RAM"), "{msg}");
    // A memory file of the wrong size, a missing one, a damaged state file.
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path("diff.mem"))
        .unwrap()
        .set_len(MEM / 2)
        .unwrap();
    assert!(e(spec(&dir, &diff, &full)).contains("the snapshot's guest has"));
    std::fs::remove_file(dir.path("diff.mem")).unwrap();
    assert!(e(spec(&dir, &diff, &full)).contains("diff.mem"));
    std::fs::write(dir.path("junk.snap"), b"junk").unwrap();
    assert!(e(spec(&dir, &dir.path("junk.snap"), &full)).contains("junk.snap"));
    // The base is never touched by a refused layering.
    let data = std::fs::read(dir.path("base.mem")).unwrap();
    assert!(data[..4096].iter().all(|&b| b == 1));
}
