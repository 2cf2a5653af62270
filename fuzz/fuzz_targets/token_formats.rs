//! Token parsing and generation: a Luhn-valid number is never a token, and every
//! generated digit token keeps length and last four and fails Luhn.
#![no_main]

use tokenvault::domain::card::{Pan, luhn_valid};
use tokenvault::domain::token::{Token, TokenFormat, candidates};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some(t) = Token::parse(s) {
        let t = t.as_str();
        assert!(t.starts_with("tok_") || !luhn_valid(t.as_bytes()));
    }
    if let Ok(pan) = Pan::parse(s) {
        for format in [TokenFormat::Bin6Last4, TokenFormat::Last4] {
            if let Some(token) = candidates(format, &pan).next() {
                let t = token.as_str();
                assert_eq!(t.len(), pan.len());
                assert!(!luhn_valid(t.as_bytes()));
                assert_eq!(&t[t.len() - 4..], pan.last4());
                assert_ne!(t, pan.expose_digits());
            }
        }
    }
});
