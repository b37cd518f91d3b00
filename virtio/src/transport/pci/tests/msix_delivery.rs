//! MSI-X: table programming, masking and pending bits, vector mapping.

use super::*;

#[test]
fn msix_programming_updates_the_sink() {
    let mut f = fixture(&[16], 3);
    // Programming while MSI-X is off installs nothing.
    let message = f.program_vector(1);
    assert_eq!(f.bar(MSIX_TABLE_OFFSET + 16, 8), message.address);
    assert_eq!(
        f.bar(MSIX_TABLE_OFFSET + 16 + 8, 4),
        u64::from(message.data)
    );
    assert!(f.sink.take().is_empty());
    f.enable_msix(false);
    assert_eq!(f.sink.take(), vec![(1, Some(message))]);
    // Masking the entry, then the function, withdraws routes; unmasking restores them.
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    assert_eq!(f.sink.take(), vec![(1, None)]);
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    f.enable_msix(true);
    assert_eq!(f.sink.take(), vec![(1, Some(message)), (1, None)]);
    f.enable_msix(false);
    assert_eq!(f.sink.take(), vec![(1, Some(message))]);
    f.set_cfg(MSIX_CONTROL, 2, 0);
    assert_eq!(f.sink.take(), vec![(1, None)]);
    // Entries past the table and odd accesses are ignored.
    f.set_bar(MSIX_TABLE_OFFSET + 3 * 16, 4, 0);
    f.set_bar(MSIX_TABLE_OFFSET + 2, 4, 0);
    f.set_bar(MSIX_TABLE_OFFSET + 4, 8, 0);
    assert!(f.sink.take().is_empty());
    assert_eq!(f.bar(MSIX_TABLE_OFFSET + 16 + 12, 4), 0);
    assert_eq!(
        f.bar(MSIX_TABLE_OFFSET + 2 * 16 + 12, 4),
        1,
        "entries start masked"
    );
}

#[test]
fn masked_vector_is_pending_and_delivered_on_unmask() {
    let mut f = fixture(&[16, 16], 3);
    f.bring_up(&[16, 16]);
    f.enable_msix(false);
    f.program_vector(1); // queue 0
    f.program_vector(2); // queue 1
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 1);
    let interrupt = f.interrupt();
    interrupt.notify_queue(0).unwrap();
    assert!(!fired(&f.transport, 1));
    assert_eq!(f.pba(), 1 << 1);
    interrupt.notify_queue(1).unwrap();
    assert!(fired(&f.transport, 2));
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 12, 4, 0);
    assert!(fired(&f.transport, 1), "delivered on unmask");
    assert_eq!(f.pba(), 0);
    // The function mask and MSI-X enable hold interrupts back the same way.
    f.enable_msix(true);
    interrupt.notify_queue(1).unwrap();
    assert!(!fired(&f.transport, 2));
    assert_eq!(f.bar(MSIX_PBA_OFFSET, 4), 1 << 2);
    f.enable_msix(false);
    assert!(fired(&f.transport, 2));
    f.set_cfg(MSIX_CONTROL, 2, 0);
    interrupt.notify_queue(0).unwrap();
    assert!(!fired(&f.transport, 1));
    f.enable_msix(false);
    assert!(fired(&f.transport, 1));
    assert_eq!(
        f.bar(ISR_OFFSET, 1),
        u64::from(ISR_QUEUE),
        "ISR is read-to-clear"
    );
    assert_eq!(f.bar(ISR_OFFSET, 1), 0);
}

#[test]
fn no_vector_means_no_interrupt() {
    let mut f = fixture(&[16], 2);
    f.bring_up(&[16]);
    f.enable_msix(false);
    f.program_vector(0);
    f.program_vector(1);
    // Out-of-range vectors read back as NO_VECTOR: the driver's sign that mapping failed.
    f.set_bar(CONFIG_MSIX_VECTOR, 2, 2);
    assert_eq!(
        f.bar(CONFIG_MSIX_VECTOR, 2),
        u64::from(VIRTIO_MSI_NO_VECTOR)
    );
    f.set_bar(QUEUE_SELECT, 2, 0);
    f.set_bar(QUEUE_MSIX_VECTOR, 2, u64::from(VIRTIO_MSI_NO_VECTOR));
    let interrupt = f.interrupt();
    interrupt.notify_config().unwrap();
    interrupt.notify_queue(0).unwrap();
    assert!(!fired(&f.transport, 0) && !fired(&f.transport, 1));
    assert_eq!(f.pba(), 0, "nothing pending either");
    assert_eq!(f.bar(ISR_OFFSET, 1), u64::from(ISR_QUEUE | ISR_CONFIG));
    assert_eq!(f.bar(CONFIG_GENERATION, 1), 1);
    f.transport.notify_config_change().unwrap();
    assert_eq!(f.bar(CONFIG_GENERATION, 1), 2);
}

#[test]
fn failed_route_update_keeps_the_interrupt_pending() {
    let mut f = fixture(&[16], 2);
    f.bring_up(&[16]); // queue 0 -> vector 1
    f.enable_msix(false);
    f.sink.failing.store(true, Ordering::SeqCst);
    let message = f.program_vector(1);
    f.interrupt().notify_queue(0).unwrap();
    assert!(!fired(&f.transport, 1), "no route, no irqfd write");
    assert_eq!(f.pba(), 1 << 1);
    // The next change to the entry retries the route, then delivers what was pending.
    f.sink.failing.store(false, Ordering::SeqCst);
    f.set_bar(MSIX_TABLE_OFFSET + 16 + 8, 4, message.data.into());
    assert_eq!(f.sink.take(), vec![(1, Some(message))]);
    assert!(fired(&f.transport, 1));
    assert_eq!(f.pba(), 0);
}
