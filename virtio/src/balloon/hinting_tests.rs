//! Free page hinting against a hostile driver: command ids of the wrong size or outside RAM,
//! pages hinted before, after or outside the host's run, ranges outside RAM. Only pages hinted
//! under the host's current run go back to the host.

use super::*;

/// The hinting queue's index when only hinting is on (inflate, deflate, hinting).
const HINTQ: usize = 2;
/// Where the driver's command id goes.
const CMD: u64 = BUF + 0x800;

fn hinting_rig() -> (Rig, BalloonHandle) {
    let rig = Rig::new(BalloonConfig {
        free_page_hinting: true,
        ..Default::default()
    });
    let handle = rig.balloon.handle();
    (rig, handle)
}

fn config_cmd(balloon: &Balloon) -> u32 {
    let mut word = [0u8; 4];
    balloon.read_config(8, &mut word);
    u32::from_le_bytes(word)
}

/// The driver's command id buffer, as Linux sends it: one device-readable le32.
fn send_cmd(rig: &Rig, id: u32) {
    rig.send(HINTQ, CMD, &id.to_le_bytes());
}

fn fill(rig: &Rig, pfn: u32, pages: u64) -> u64 {
    let at = u64::from(pfn) * PAGE_SIZE;
    rig.mem
        .write_slice(&vec![0xcd; (pages * PAGE_SIZE) as usize], GuestAddress(at))
        .unwrap();
    at
}

#[test]
fn the_feature_the_queue_and_the_config_field() {
    let (rig, handle) = hinting_rig();
    let features = rig.balloon.features();
    assert_ne!(features & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT), 0);
    assert_eq!(rig.balloon.queue_max_sizes().len(), 3);
    assert_eq!(config_cmd(&rig.balloon), HINT_CMD_ID_STOP);
    // Ids start at 2 and never reuse STOP or DONE.
    assert_eq!(handle.start_hinting(true).unwrap(), 2);
    assert_eq!(config_cmd(&rig.balloon), 2);
    assert_eq!(handle.start_hinting(true).unwrap(), 3);
    handle.stop_hinting().unwrap();
    assert_eq!(config_cmd(&rig.balloon), HINT_CMD_ID_DONE);
    // The driver cannot write the field.
    let mut balloon = Balloon::new(BalloonConfig {
        free_page_hinting: true,
        ..Default::default()
    })
    .unwrap();
    balloon.handle().start_hinting(false).unwrap();
    balloon.write_config(8, &[9, 9, 9, 9]);
    assert_eq!(config_cmd(&balloon), 2);
    // A reset driver holds nothing: no run is under way.
    balloon.reset();
    assert_eq!(config_cmd(&balloon), HINT_CMD_ID_STOP);
    assert_eq!(balloon.handle().hinting_status().unwrap().guest_cmd, None);
}

#[test]
fn hinting_off_refuses_every_command() {
    let rig = Rig::new(BalloonConfig::default());
    let handle = rig.balloon.handle();
    assert!(matches!(
        handle.start_hinting(true),
        Err(HintingError::NotEnabled)
    ));
    assert!(matches!(
        handle.stop_hinting(),
        Err(HintingError::NotEnabled)
    ));
    assert!(matches!(
        handle.hinting_status(),
        Err(HintingError::NotEnabled)
    ));
    assert_eq!(
        rig.balloon.features() & (1 << VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        0
    );
}

#[test]
fn a_run_gives_hinted_pages_back_and_is_acknowledged() {
    let (rig, handle) = hinting_rig();
    let at = fill(&rig, PAGE, 4);
    let id = handle.start_hinting(true).unwrap();
    send_cmd(&rig, id);
    assert_eq!(handle.hinting_status().unwrap().guest_cmd, Some(id));
    rig.send_descs(HINTQ, &[writable(at, 0x2000)]);
    rig.send_descs(HINTQ, &[writable(at + 0x2000, 0x1800)]); // a partial page stays
    let c = rig.counters();
    assert_eq!(load(&c.hinted_bytes), 0x3000);
    assert_eq!(page_byte(&rig.mem, PAGE), 0);
    assert_eq!(page_byte(&rig.mem, PAGE + 2), 0);
    assert_eq!(page_byte(&rig.mem, PAGE + 3), 0xcd);
    // The driver's end of the run: acknowledged with DONE and a configuration interrupt.
    let configs = rig.interrupt.config_count();
    send_cmd(&rig, HINT_CMD_ID_STOP);
    // The acknowledgement follows the used buffer: wait for it.
    assert!(eventually(|| rig.interrupt.config_count() == configs + 1));
    let status = handle.hinting_status().unwrap();
    assert_eq!(
        status,
        HintingStatus {
            host_cmd: HINT_CMD_ID_DONE,
            guest_cmd: Some(0)
        }
    );
    // Pages arriving after DONE may be the guest's again: refused, left alone.
    let late = fill(&rig, PAGE + 8, 1);
    rig.send_descs(HINTQ, &[writable(late, 0x1000)]);
    assert_eq!(page_byte(&rig.mem, PAGE + 8), 0xcd);
    assert_eq!(load(&c.hinted_bytes), 0x3000);
    assert_eq!(load(&c.refused_hints), 1);
}

#[test]
fn without_acknowledge_the_host_stops_the_run() {
    let (rig, handle) = hinting_rig();
    let id = handle.start_hinting(false).unwrap();
    send_cmd(&rig, id);
    let configs = rig.interrupt.config_count();
    send_cmd(&rig, HINT_CMD_ID_STOP);
    // Give a wrong acknowledgement the time to show.
    std::thread::sleep(std::time::Duration::from_millis(50));
    // The guest keeps holding its pages until the host says DONE.
    assert_eq!(handle.hinting_status().unwrap().host_cmd, id);
    assert_eq!(rig.interrupt.config_count(), configs);
    handle.stop_hinting().unwrap();
    assert_eq!(handle.hinting_status().unwrap().host_cmd, HINT_CMD_ID_DONE);
}

#[test]
fn hostile_hints_are_refused() {
    let (rig, handle) = hinting_rig();
    let at = fill(&rig, PAGE, 2);
    let c = rig.counters();
    // Pages before any run, and before the driver acknowledged the host's id.
    rig.send_descs(HINTQ, &[writable(at, 0x1000)]);
    let id = handle.start_hinting(true).unwrap();
    rig.send_descs(HINTQ, &[writable(at, 0x1000)]);
    // Pages under an old id: the driver answered a run the host already replaced.
    send_cmd(&rig, id);
    let newer = handle.start_hinting(true).unwrap();
    rig.send_descs(HINTQ, &[writable(at, 0x1000)]);
    assert_eq!(load(&c.refused_hints), 3);
    assert_eq!(page_byte(&rig.mem, PAGE), 0xcd);
    // Command ids of the wrong size, or outside RAM, change nothing.
    rig.send(HINTQ, CMD, &[newer as u8, 0, 0, 0, 0]);
    rig.send(HINTQ, CMD, &[newer as u8, 0]);
    rig.send_descs(HINTQ, &[readable(0xff_fffe, 4)]);
    assert_eq!(load(&c.refused_hints), 6);
    assert_eq!(handle.hinting_status().unwrap().guest_cmd, Some(id));
    // Under the current run, ranges outside RAM or crossing its end are refused.
    send_cmd(&rig, newer);
    rig.send_descs(
        HINTQ,
        &[writable(0xff_f000, 0x2000), writable(u64::MAX - 10, 100)],
    );
    assert_eq!(load(&c.discard_failures), 2);
    assert_eq!(load(&c.hinted_bytes), 0);
    // A chain of id then pages, as one buffer, works; the page is given back.
    rig.send_descs(HINTQ, &[readable(CMD, 4), writable(at + 0x1000, 0x1000)]);
    assert_eq!(load(&c.hinted_bytes), 0x1000);
    assert_eq!(page_byte(&rig.mem, PAGE + 1), 0);
    assert_eq!(page_byte(&rig.mem, PAGE), 0xcd);
}

#[test]
fn hinting_sits_between_statistics_and_reporting() {
    let rig = Rig::new(BalloonConfig {
        stats_interval_s: 60,
        free_page_hinting: true,
        free_page_reporting: true,
        ..Default::default()
    });
    let handle = rig.balloon.handle();
    assert_eq!(rig.balloon.queue_max_sizes().len(), 5);
    let at = fill(&rig, PAGE, 2);
    let id = handle.start_hinting(true).unwrap();
    rig.send(3, CMD, &id.to_le_bytes());
    rig.send_descs(3, &[writable(at, 0x1000)]);
    rig.send_descs(4, &[writable(at + 0x1000, 0x1000)]);
    let c = rig.counters();
    assert_eq!(
        (load(&c.hinted_bytes), load(&c.reported_bytes)),
        (0x1000, 0x1000)
    );
}
