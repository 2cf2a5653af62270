//! The vendored sled's patch (`vendor/README.md`): a job handed to sled's I/O
//! thread pool (one per flush) wakes one idle pool thread, not every idle one.
//! Published sled 0.34.7 woke all seven, and each woken thread costs a context
//! switch: under load that was a fifth of the vault's CPU.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// Context switches so far of sled's I/O pool threads, and how many there are.
#[cfg(target_os = "linux")]
fn io_pool_switches() -> (u64, usize) {
    let mut switches = 0;
    let mut threads = 0;
    for task in std::fs::read_dir("/proc/self/task").unwrap() {
        let dir = task.unwrap().path();
        let Ok(comm) = std::fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if !comm.starts_with("sled-io") {
            continue;
        }
        let Ok(status) = std::fs::read_to_string(dir.join("status")) else {
            continue;
        };
        threads += 1;
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += n.trim().parse::<u64>().unwrap();
            }
        }
    }
    (switches, threads)
}

#[cfg(target_os = "linux")]
#[test]
fn a_flush_wakes_one_io_thread_not_all_of_them() {
    let dir = std::env::temp_dir().join(format!("tokenvault-sled-io-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let db = sled::Config::new().path(&dir).flush_every_ms(None).open().unwrap();
    db.insert(b"warm", b"up").unwrap();
    db.flush().unwrap();
    // The pool keeps seven idle threads; let them all go to sleep.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let (before, idle) = io_pool_switches();
    assert!(idle >= 4, "sled's I/O pool keeps idle threads ({idle} found)");
    let flushes: u64 = 300;
    for i in 0..flushes {
        db.insert(i.to_be_bytes(), vec![7u8; 64]).unwrap();
        db.flush().unwrap();
    }
    let (after, _) = io_pool_switches();
    let per_flush = (after - before) as f64 / flushes as f64;
    drop(db);
    let _ = std::fs::remove_dir_all(&dir);
    // The thread that takes the job switches a few times (woken, then waiting on its
    // own write): ≈ 2.6 per flush on the development VM. Waking every idle thread adds
    // one switch per idle thread: ≈ 8.8 there with the published crate.
    assert!(
        per_flush < 5.0,
        "{per_flush:.2} I/O-pool context switches per flush with {idle} idle threads: the pool wakes them all"
    );
}
