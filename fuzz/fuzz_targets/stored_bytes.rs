//! Bytes read back from storage or from custodians: card payloads, key shares and
//! audit records. Never a panic, whatever was on disk.
#![no_main]

use tokenvault::audit::{AuditRecord, verify};
use tokenvault::domain::card::CardPayload;
use tokenvault::keys::shares::Share;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = CardPayload::decode(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = Share::parse(s);
        let records: Vec<AuditRecord> = s.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        let _ = verify(&records, None);
    }
});
