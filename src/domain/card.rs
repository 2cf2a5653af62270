//! Card data: the PAN, its brand, the expiry and the cardholder name.
//!
//! Every secret here lives in a zeroizing buffer and has a redacting `Debug`.
//! Errors describe what is wrong, never the value.

use std::fmt;

use serde::Serialize;
use zeroize::{Zeroize, Zeroizing};

/// Why a string is not a card number. The variants carry no part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PanError {
    #[error("the card number must contain only the ASCII digits 0-9")]
    NotDigits,
    #[error("the card number must be 12 to 19 digits long")]
    Length,
    #[error("the card number fails the Luhn check")]
    Luhn,
    #[error("the card number's length does not match its brand")]
    BrandLength,
}

/// A primary account number: 12–19 ASCII digits, Luhn-valid, with a length that
/// fits its brand. Zeroized on drop; `Debug` never shows it.
#[derive(Clone)]
pub struct Pan(Zeroizing<String>);

impl Pan {
    /// Parses a PAN. Anything but ASCII digits (spaces, dashes, non-ASCII digits)
    /// is rejected rather than cleaned up: the edge must send exactly the number.
    pub fn parse(s: &str) -> Result<Pan, PanError> {
        if !s.bytes().all(|b| b.is_ascii_digit()) || s.is_empty() {
            return Err(PanError::NotDigits);
        }
        if !(12..=19).contains(&s.len()) {
            return Err(PanError::Length);
        }
        if !luhn_valid(s.as_bytes()) {
            return Err(PanError::Luhn);
        }
        let brand = Brand::detect(s.as_bytes());
        if !brand.allows_length(s.len()) {
            return Err(PanError::BrandLength);
        }
        Ok(Pan(Zeroizing::new(s.to_owned())))
    }

    /// The full number. Named so that every place that reveals the PAN is easy to find.
    pub fn expose_digits(&self) -> &str {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The first six digits (the BIN/IIN), which PCI DSS allows to be displayed.
    pub fn bin6(&self) -> &str {
        &self.0[..6]
    }

    /// The last four digits, which PCI DSS allows to be displayed.
    pub fn last4(&self) -> &str {
        &self.0[self.0.len() - 4..]
    }

    pub fn brand(&self) -> Brand {
        Brand::detect(self.0.as_bytes())
    }
}

impl fmt::Debug for Pan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pan([REDACTED])")
    }
}

/// The Luhn (mod 10) check over ASCII digits.
pub fn luhn_valid(digits: &[u8]) -> bool {
    luhn_sum(digits).is_multiple_of(10)
}

/// Whether free text holds something shaped like a card number: 12–19 digits
/// passing Luhn, also when written in groups (`4111 1111 1111 1111`,
/// `4111-1111-1111-1111`, `4111.1111…`). Digit groups joined by one separator
/// (space, `-`, `.`, `/`, `_`) are scanned as every run of consecutive groups, so
/// a number is found even next to other digits (`order 12 4111 1111 1111 1111`).
pub fn contains_pan(text: &str) -> bool {
    let bytes = text.as_bytes();
    let is_sep = |b: u8| matches!(b, b' ' | b'-' | b'.' | b'/' | b'_');
    let mut i = 0;
    while i < bytes.len() {
        if !bytes[i].is_ascii_digit() {
            i += 1;
            continue;
        }
        // One chain: digit groups separated by single separators.
        let mut groups: Vec<&[u8]> = Vec::new();
        loop {
            let start = i;
            while i < bytes.len() && bytes[i].is_ascii_digit() {
                i += 1;
            }
            groups.push(&bytes[start..i]);
            if i + 1 < bytes.len() && is_sep(bytes[i]) && bytes[i + 1].is_ascii_digit() {
                i += 1;
            } else {
                break;
            }
        }
        for from in 0..groups.len() {
            let mut run: Vec<u8> = Vec::with_capacity(19);
            for g in &groups[from..] {
                run.extend_from_slice(g);
                if run.len() > 19 {
                    break;
                }
                if run.len() >= 12 && luhn_valid(&run) {
                    return true;
                }
            }
        }
    }
    false
}

fn luhn_sum(digits: &[u8]) -> u32 {
    digits
        .iter()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b.wrapping_sub(b'0'));
            if i % 2 == 1 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum()
}

/// Card brand, detected from the leading digits (IIN ranges).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Brand {
    Visa,
    Mastercard,
    Amex,
    Discover,
    Jcb,
    Diners,
    Unionpay,
    Maestro,
    Unknown,
}

impl Brand {
    /// Detects the brand from the leading digits; `digits` must be ASCII digits.
    pub fn detect(digits: &[u8]) -> Brand {
        let prefix = |n: usize| -> u32 {
            digits
                .iter()
                .take(n)
                .fold(0u32, |acc, b| acc * 10 + u32::from(b.wrapping_sub(b'0')))
        };
        if digits.len() < 6 {
            return Brand::Unknown;
        }
        let (p1, p2, p3, p4, p6) = (prefix(1), prefix(2), prefix(3), prefix(4), prefix(6));
        if p1 == 4 {
            Brand::Visa
        } else if (51..=55).contains(&p2) || (2221..=2720).contains(&p4) {
            Brand::Mastercard
        } else if p2 == 34 || p2 == 37 {
            Brand::Amex
        } else if p4 == 6011 || (644..=649).contains(&p3) || p2 == 65 || (622126..=622925).contains(&p6) {
            Brand::Discover
        } else if (3528..=3589).contains(&p4) {
            Brand::Jcb
        } else if (300..=305).contains(&p3) || p2 == 36 || p2 == 38 || p2 == 39 {
            Brand::Diners
        } else if p2 == 62 {
            Brand::Unionpay
        } else if p2 == 50 || (56..=69).contains(&p2) {
            Brand::Maestro
        } else {
            Brand::Unknown
        }
    }

    /// Whether a PAN of this brand may have `len` digits.
    pub fn allows_length(self, len: usize) -> bool {
        match self {
            Brand::Visa => matches!(len, 13 | 16 | 19),
            Brand::Mastercard => len == 16,
            Brand::Amex => len == 15,
            Brand::Discover | Brand::Jcb | Brand::Unionpay => (16..=19).contains(&len),
            Brand::Diners => (14..=19).contains(&len),
            Brand::Maestro | Brand::Unknown => (12..=19).contains(&len),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Brand::Visa => "visa",
            Brand::Mastercard => "mastercard",
            Brand::Amex => "amex",
            Brand::Discover => "discover",
            Brand::Jcb => "jcb",
            Brand::Diners => "diners",
            Brand::Unionpay => "unionpay",
            Brand::Maestro => "maestro",
            Brand::Unknown => "unknown",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_u8(v: u8) -> Option<Brand> {
        [
            Brand::Visa,
            Brand::Mastercard,
            Brand::Amex,
            Brand::Discover,
            Brand::Jcb,
            Brand::Diners,
            Brand::Unionpay,
            Brand::Maestro,
            Brand::Unknown,
        ]
        .get(usize::from(v))
        .copied()
    }
}

/// Why an expiry is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ExpiryError {
    #[error("exp_month must be between 1 and 12")]
    Month,
    #[error("exp_year must be a four-digit year no more than 50 years ahead")]
    Year,
    #[error("the card has expired")]
    Expired,
}

/// A card expiry (month and four-digit year). A card is valid through the last
/// day of its expiry month.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Expiry {
    month: u8,
    year: u16,
}

impl Expiry {
    /// Parses an expiry, rejecting one that ended before `today` (year, month).
    pub fn parse(month: i64, year: i64, today: (i32, u8)) -> Result<Expiry, ExpiryError> {
        if !(1..=12).contains(&month) {
            return Err(ExpiryError::Month);
        }
        let (this_year, this_month) = (i64::from(today.0), i64::from(today.1));
        if !(2000..=this_year + 50).contains(&year) {
            return Err(ExpiryError::Year);
        }
        if (year, month) < (this_year, this_month) {
            return Err(ExpiryError::Expired);
        }
        // In range by the checks above.
        Ok(Expiry {
            month: month as u8,
            year: year as u16,
        })
    }

    /// Rebuilds an expiry read back from an authenticated record (no "expired" check:
    /// a stored card may have expired since).
    pub fn from_stored(month: u8, year: u16) -> Option<Expiry> {
        ((1..=12).contains(&month) && year >= 2000).then_some(Expiry { month, year })
    }

    pub fn month(self) -> u8 {
        self.month
    }

    pub fn year(self) -> u16 {
        self.year
    }
}

impl fmt::Debug for Expiry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Expiry([REDACTED])")
    }
}

/// Why a cardholder name is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cardholder_name must be 1 to 128 characters without control characters")]
pub struct NameError;

/// The cardholder name, as cardholder data: zeroized, redacted in `Debug`.
#[derive(Clone)]
pub struct CardholderName(Zeroizing<String>);

impl CardholderName {
    pub fn parse(s: &str) -> Result<CardholderName, NameError> {
        let n = s.chars().count();
        if n == 0 || n > 128 || s.chars().any(char::is_control) {
            return Err(NameError);
        }
        Ok(CardholderName(Zeroizing::new(s.to_owned())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for CardholderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardholderName([REDACTED])")
    }
}

/// Why a CVV is not acceptable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cvv must be 3 ASCII digits (4 for American Express)")]
pub struct CvvError;

/// A card verification value. Sensitive authentication data (PCI DSS 3.3): never
/// stored at rest, zeroized on drop, redacted in `Debug`.
#[derive(Clone)]
pub struct Cvv(Zeroizing<String>);

impl Cvv {
    /// Parses a CVV for a card of `brand`: 4 digits for Amex, 3 otherwise.
    pub fn parse(s: &str, brand: Brand) -> Result<Cvv, CvvError> {
        let len = if brand == Brand::Amex { 4 } else { 3 };
        if s.len() != len || !s.bytes().all(|b| b.is_ascii_digit()) {
            return Err(CvvError);
        }
        Ok(Cvv(Zeroizing::new(s.to_owned())))
    }

    /// Rebuilds a CVV that was validated when it was received.
    pub fn from_trusted(s: &str) -> Option<Cvv> {
        ((3..=4).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit())).then(|| Cvv(Zeroizing::new(s.to_owned())))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Cvv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cvv([REDACTED])")
    }
}

/// What the vault encrypts per record: the PAN, the expiry and the name.
#[derive(Clone)]
pub struct CardPayload {
    pub pan: Pan,
    pub expiry: Expiry,
    pub name: Option<CardholderName>,
}

impl fmt::Debug for CardPayload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CardPayload([REDACTED])")
    }
}

const PAYLOAD_V1: u8 = 1;

impl CardPayload {
    /// Serializes the payload into a zeroizing buffer, ready to be sealed.
    /// Layout (v1): version, PAN length, PAN, month, year (BE u16), name length (BE u16), name.
    pub fn encode(&self) -> Zeroizing<Vec<u8>> {
        let pan = self.pan.expose_digits().as_bytes();
        let name = self.name.as_ref().map(|n| n.expose().as_bytes()).unwrap_or(&[]);
        let mut out = Zeroizing::new(Vec::with_capacity(6 + pan.len() + name.len()));
        out.push(PAYLOAD_V1);
        // PAN is at most 19 bytes and the name at most 128 chars (512 bytes), so both fit.
        out.push(pan.len() as u8);
        out.extend_from_slice(pan);
        out.push(self.expiry.month);
        out.extend_from_slice(&self.expiry.year.to_be_bytes());
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        out
    }

    /// Parses a decrypted payload. `None` if the bytes are not a v1 payload.
    pub fn decode(bytes: &[u8]) -> Option<CardPayload> {
        let (&version, rest) = bytes.split_first()?;
        if version != PAYLOAD_V1 {
            return None;
        }
        let (&pan_len, rest) = rest.split_first()?;
        let pan_len = usize::from(pan_len);
        if rest.len() < pan_len + 5 {
            return None;
        }
        let (pan_bytes, rest) = rest.split_at(pan_len);
        let pan = Pan::parse(std::str::from_utf8(pan_bytes).ok()?).ok()?;
        let month = rest[0];
        let year = u16::from_be_bytes([rest[1], rest[2]]);
        let name_len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        let rest = &rest[5..];
        if rest.len() != name_len {
            return None;
        }
        let name = if name_len == 0 {
            None
        } else {
            let mut s = String::from_utf8(rest.to_vec()).ok()?;
            let parsed = CardholderName::parse(&s).ok();
            s.zeroize();
            Some(parsed?)
        };
        Some(CardPayload {
            pan,
            expiry: Expiry::from_stored(month, year)?,
            name,
        })
    }
}

#[cfg(test)]
pub(crate) mod test_pans {
    /// Completes `prefix` + random-free filler to a Luhn-valid number of `len` digits.
    pub(crate) fn with_check_digit(body: &str) -> String {
        for d in 0..10u8 {
            let candidate = format!("{body}{d}");
            if super::luhn_valid(candidate.as_bytes()) {
                return candidate;
            }
        }
        unreachable!("one of ten check digits always satisfies Luhn")
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn known_test_cards_parse_with_brand() {
        for (pan, brand) in [
            ("4111111111111111", Brand::Visa),
            ("4012888888881881", Brand::Visa),
            ("4222222222222", Brand::Visa),
            ("5555555555554444", Brand::Mastercard),
            ("2223003122003222", Brand::Mastercard),
            ("378282246310005", Brand::Amex),
            ("6011111111111117", Brand::Discover),
            ("3530111333300000", Brand::Jcb),
            ("36227206271667", Brand::Diners),
            ("6200000000000005", Brand::Unionpay),
        ] {
            let p = Pan::parse(pan).unwrap();
            assert_eq!(p.brand(), brand, "{pan}");
            assert_eq!(p.len(), pan.len());
        }
    }

    #[test]
    fn rejects_non_cards() {
        assert_eq!(Pan::parse("4111111111111112").unwrap_err(), PanError::Luhn);
        assert_eq!(Pan::parse("4111 1111 1111 1111").unwrap_err(), PanError::NotDigits);
        assert_eq!(Pan::parse("4111-1111-1111-1111").unwrap_err(), PanError::NotDigits);
        // Arabic-Indic and full-width digits are digits, but not ASCII digits.
        assert_eq!(Pan::parse("٤١١١١١١١١١١١١١١١").unwrap_err(), PanError::NotDigits);
        assert_eq!(
            Pan::parse("４１１１１１１１１１１１１１１１").unwrap_err(),
            PanError::NotDigits
        );
        assert_eq!(Pan::parse("").unwrap_err(), PanError::NotDigits);
        assert_eq!(Pan::parse("42424242426").unwrap_err(), PanError::Length);
        assert_eq!(Pan::parse(&"4".repeat(20)).unwrap_err(), PanError::Length);
        // A Luhn-valid 15-digit Visa is not a Visa.
        let visa15 = test_pans::with_check_digit("41111111111111");
        assert_eq!(Pan::parse(&visa15).unwrap_err(), PanError::BrandLength);
    }

    #[test]
    fn debug_is_redacted() {
        let p = Pan::parse("4111111111111111").unwrap();
        let shown = format!("{p:?}");
        assert!(!shown.contains("4111"), "{shown}");
        let payload = CardPayload {
            pan: p,
            expiry: Expiry::parse(12, 2030, (2026, 11)).unwrap(),
            name: Some(CardholderName::parse("Ada Lovelace").unwrap()),
        };
        let shown = format!("{payload:?}");
        assert!(!shown.contains("4111") && !shown.contains("Ada") && !shown.contains("2030"));
    }

    #[test]
    fn cvv_rules() {
        assert!(Cvv::parse("737", Brand::Visa).is_ok());
        assert!(Cvv::parse("7373", Brand::Amex).is_ok());
        assert!(Cvv::parse("7373", Brand::Visa).is_err());
        assert!(Cvv::parse("737", Brand::Amex).is_err());
        assert!(Cvv::parse("73a", Brand::Visa).is_err());
        assert!(Cvv::parse("٧٣٧", Brand::Visa).is_err());
        assert_eq!(
            format!("{:?}", Cvv::parse("737", Brand::Visa).unwrap()),
            "Cvv([REDACTED])"
        );
    }

    #[test]
    fn expiry_rules() {
        let today = (2026, 11);
        assert!(Expiry::parse(11, 2026, today).is_ok());
        assert_eq!(Expiry::parse(10, 2026, today).unwrap_err(), ExpiryError::Expired);
        assert_eq!(Expiry::parse(0, 2027, today).unwrap_err(), ExpiryError::Month);
        assert_eq!(Expiry::parse(13, 2027, today).unwrap_err(), ExpiryError::Month);
        assert_eq!(Expiry::parse(1, 27, today).unwrap_err(), ExpiryError::Year);
        assert_eq!(Expiry::parse(1, 2100, today).unwrap_err(), ExpiryError::Year);
    }

    #[test]
    fn payload_rejects_garbage() {
        assert!(CardPayload::decode(&[]).is_none());
        assert!(CardPayload::decode(&[2, 0]).is_none());
        assert!(CardPayload::decode(&[1, 16, b'4']).is_none());
    }

    fn arb_pan() -> impl Strategy<Value = String> {
        (12usize..=19, proptest::collection::vec(0u8..10, 19)).prop_filter_map("brand length", |(len, digits)| {
            let body: String = digits[..len - 1].iter().map(|d| char::from(b'0' + d)).collect();
            let pan = test_pans::with_check_digit(&body);
            Pan::parse(&pan).ok().map(|_| pan)
        })
    }

    proptest! {
        #[test]
        fn payload_roundtrip(pan in arb_pan(), month in 1i64..=12, year in 2026i64..2070,
                             name in proptest::option::of("[A-Za-z .'-]{1,40}")) {
            let payload = CardPayload {
                pan: Pan::parse(&pan).unwrap(),
                expiry: Expiry::parse(month, year, (2026, 1)).unwrap(),
                name: name.as_deref().map(|n| CardholderName::parse(n).unwrap()),
            };
            let back = CardPayload::decode(&payload.encode()).unwrap();
            prop_assert_eq!(back.pan.expose_digits(), pan.as_str());
            prop_assert_eq!(back.expiry.month() as i64, month);
            prop_assert_eq!(back.expiry.year() as i64, year);
            prop_assert_eq!(back.name.as_ref().map(|n| n.expose().to_owned()), name);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,25}") {
            let _ = Pan::parse(&s);
        }

        #[test]
        fn one_changed_digit_breaks_luhn(pan in arb_pan(), pos in 0usize..19, delta in 1u8..10) {
            let mut bytes = pan.clone().into_bytes();
            let i = pos % bytes.len();
            bytes[i] = b'0' + (bytes[i] - b'0' + delta) % 10;
            prop_assert!(!luhn_valid(&bytes));
        }
    }
}

#[cfg(test)]
mod free_text_tests {
    use super::contains_pan;
    use proptest::prelude::*;

    #[test]
    fn card_numbers_in_free_text_are_found_however_grouped() {
        for hit in [
            "4111111111111111",
            "pay 4111 1111 1111 1111",
            "4111-1111-1111-1111 thanks",
            "ref:4111.1111.1111.1111",
            "order 12 4111 1111 1111 1111",
            "3782 822463 10005",
            "x5555555555554444y",
        ] {
            assert!(contains_pan(hit), "{hit}");
        }
        for miss in [
            "order-1001",
            "4111 1111 1111 1112",
            "2026-11-30 12:00",
            "invoice 123456789",
            "4111  1111 1111 1111", // two separators break the chain
            "",
        ] {
            assert!(!contains_pan(miss), "{miss}");
        }
    }

    proptest! {
        /// Any valid test PAN, split into groups by any single separators and
        /// embedded in any text, is found.
        #[test]
        fn grouped_pans_are_always_found(
            cut in proptest::collection::vec(1usize..6, 1..6),
            sep in prop::sample::select(vec![" ", "-", ".", "/", "_"]),
            prefix in "[a-z :]{0,8}",
            suffix in "[a-z :]{0,8}",
        ) {
            let pan = "5555555555554444";
            let mut text = prefix.clone();
            let mut at = 0;
            for c in cut {
                if at >= pan.len() { break; }
                let end = (at + c).min(pan.len());
                text.push_str(&pan[at..end]);
                if end < pan.len() { text.push_str(sep); }
                at = end;
            }
            text.push_str(&pan[at..]);
            text.push_str(&suffix);
            prop_assert!(contains_pan(&text), "{}", text);
        }
    }
}
