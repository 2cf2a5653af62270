//! PAN and expiry parsing: never a panic; whatever parses is a valid card number.
#![no_main]

use tokenvault::domain::card::{Brand, Expiry, Pan, luhn_valid};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(pan) = Pan::parse(s) {
            let d = pan.expose_digits();
            assert!((12..=19).contains(&d.len()));
            assert!(d.bytes().all(|b| b.is_ascii_digit()));
            assert!(luhn_valid(d.as_bytes()));
            assert!(Brand::detect(d.as_bytes()).allows_length(d.len()));
            assert!(!format!("{pan:?}").contains(d));
        }
    }
    if data.len() >= 16 {
        let m = i64::from_le_bytes(data[..8].try_into().unwrap_or([0; 8]));
        let y = i64::from_le_bytes(data[8..16].try_into().unwrap_or([0; 8]));
        if let Ok(e) = Expiry::parse(m, y, (2026, 11)) {
            assert!((1..=12).contains(&e.month()));
            assert!((2026..=2076).contains(&i64::from(e.year())));
        }
    }
});
