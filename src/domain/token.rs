//! Tokens: random surrogates for PANs.
//!
//! Digit tokens keep the PAN's length (and its BIN and/or last four) but always
//! **fail** the Luhn check, so a token can never pass for a card number. Tokens
//! are drawn from a CSPRNG and never computed from the PAN: ChaCha12 (`StdRng`)
//! seeded afresh from the operating system for each candidate, so a token costs
//! one `getrandom` call instead of one per digit, and no generator state outlives it.

use std::fmt;

use base64::Engine as _;
use rand::{CryptoRng, Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
use serde::{Deserialize, Serialize};

use super::card::{Pan, luhn_valid};

/// The shape of token a caller asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenFormat {
    /// Same length as the PAN; first 6 and last 4 kept; random middle; fails Luhn.
    #[default]
    Bin6Last4,
    /// Same length as the PAN; last 4 kept; the rest random; fails Luhn.
    Last4,
    /// `tok_` followed by 128 random bits, base64url.
    Opaque,
}

impl TokenFormat {
    pub fn as_str(self) -> &'static str {
        match self {
            TokenFormat::Bin6Last4 => "bin6_last4",
            TokenFormat::Last4 => "last4",
            TokenFormat::Opaque => "opaque",
        }
    }

    pub(crate) fn to_u8(self) -> u8 {
        self as u8
    }

    pub(crate) fn from_u8(v: u8) -> Option<TokenFormat> {
        [TokenFormat::Bin6Last4, TokenFormat::Last4, TokenFormat::Opaque]
            .get(usize::from(v))
            .copied()
    }
}

const OPAQUE_PREFIX: &str = "tok_";
const OPAQUE_RANDOM_BYTES: usize = 16;
/// Spaces up to this size are enumerated (in random order) so that exhaustion is
/// detected exactly; larger ones are sampled at random.
const ENUMERATE_LIMIT: u64 = 10_000;
/// Random draws before a large space is declared exhausted. With a space at most
/// half full the chance of 32 collisions in a row is below 2^-32.
const RANDOM_ATTEMPTS: usize = 32;

/// A token as callers see it. Public data, not a secret.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Token(String);

impl Token {
    /// Accepts a string with a token's shape: 12–19 ASCII digits failing the Luhn
    /// check, or `tok_` + 22 base64url characters. Anything else cannot be a token
    /// (a Luhn-valid digit string may be a PAN, and is never looked up).
    pub fn parse(s: &str) -> Option<Token> {
        let is_digit_token =
            (12..=19).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit()) && !luhn_valid(s.as_bytes());
        let is_opaque = s.strip_prefix(OPAQUE_PREFIX).is_some_and(|rest| {
            rest.len() == 22
                && rest
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
        (is_digit_token || is_opaque).then(|| Token(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Token({})", self.0)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Candidate tokens for one PAN, in the order to try them. The store's
/// insert-if-absent decides which one is taken; when the iterator runs dry the
/// format's space for this BIN and last four is exhausted.
pub struct Candidates {
    inner: CandidatesInner,
}

enum CandidatesInner {
    Enumerated(std::vec::IntoIter<Token>),
    Random {
        format: TokenFormat,
        template: Template,
        left: usize,
    },
}

/// What is kept of the PAN and how many random digits fill the rest.
#[derive(Clone)]
struct Template {
    prefix: String,
    random_len: usize,
    suffix: String,
}

impl Template {
    fn assemble(&self, middle: &[u8]) -> String {
        let mut s = String::with_capacity(self.prefix.len() + middle.len() + self.suffix.len());
        s.push_str(&self.prefix);
        s.extend(middle.iter().map(|d| char::from(b'0' + d)));
        s.push_str(&self.suffix);
        s
    }
}

impl Iterator for Candidates {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        match &mut self.inner {
            CandidatesInner::Enumerated(it) => it.next(),
            CandidatesInner::Random { format, template, left } => {
                if *left == 0 {
                    return None;
                }
                *left -= 1;
                let mut rng = seeded();
                Some(match format {
                    TokenFormat::Opaque => opaque(&mut rng),
                    _ => random_digit_token(template, &mut rng),
                })
            }
        }
    }
}

/// Token candidates of `format` for `pan`.
pub fn candidates(format: TokenFormat, pan: &Pan) -> Candidates {
    let template = match format {
        TokenFormat::Opaque => {
            let template = Template {
                prefix: String::new(),
                random_len: 0,
                suffix: String::new(),
            };
            return Candidates {
                inner: CandidatesInner::Random {
                    format,
                    template,
                    left: RANDOM_ATTEMPTS,
                },
            };
        }
        TokenFormat::Bin6Last4 => Template {
            prefix: pan.bin6().to_owned(),
            random_len: pan.len() - 10,
            suffix: pan.last4().to_owned(),
        },
        TokenFormat::Last4 => Template {
            prefix: String::new(),
            random_len: pan.len() - 4,
            suffix: pan.last4().to_owned(),
        },
    };
    let space = 10u64.checked_pow(template.random_len as u32).unwrap_or(u64::MAX);
    if space <= ENUMERATE_LIMIT {
        let mut all: Vec<Token> = (0..space)
            .map(|n| {
                let middle: Vec<u8> = (0..template.random_len)
                    .rev()
                    .map(|i| ((n / 10u64.pow(i as u32)) % 10) as u8)
                    .collect();
                template.assemble(&middle)
            })
            .filter(|s| !luhn_valid(s.as_bytes()))
            .map(Token)
            .collect();
        all.shuffle(&mut seeded());
        Candidates {
            inner: CandidatesInner::Enumerated(all.into_iter()),
        }
    } else {
        Candidates {
            inner: CandidatesInner::Random {
                format,
                template,
                left: RANDOM_ATTEMPTS,
            },
        }
    }
}

/// A CSPRNG seeded from the operating system's (one `getrandom` call).
fn seeded() -> StdRng {
    // `OsRng` panics when the OS has no randomness to give: no weaker fallback.
    let mut seed = <StdRng as SeedableRng>::Seed::default();
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut seed);
    StdRng::from_seed(seed)
}

/// Rejection sampling: uniform over the Luhn-failing fillings of the template.
fn random_digit_token<R: Rng + CryptoRng>(template: &Template, rng: &mut R) -> Token {
    let mut middle = vec![0u8; template.random_len];
    loop {
        for d in middle.iter_mut() {
            *d = rng.gen_range(0..10);
        }
        let s = template.assemble(&middle);
        if !luhn_valid(s.as_bytes()) {
            return Token(s);
        }
    }
}

fn opaque<R: Rng + CryptoRng>(rng: &mut R) -> Token {
    let mut bytes = [0u8; OPAQUE_RANDOM_BYTES];
    rng.fill_bytes(&mut bytes);
    Token(format!(
        "{OPAQUE_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use proptest::prelude::*;

    use super::*;
    use crate::domain::card::test_pans::with_check_digit;

    /// A Luhn-valid PAN of the given length that starts with `prefix` and is
    /// accepted for its brand.
    fn pan_with(prefix: &str, len: usize, filler: &[u8]) -> Option<Pan> {
        let mut body = prefix.to_owned();
        let mut i = 0;
        while body.len() < len - 1 {
            body.push(char::from(b'0' + filler[i % filler.len()] % 10));
            i += 1;
        }
        Pan::parse(&with_check_digit(&body)).ok()
    }

    /// Brand prefixes with the lengths each brand allows.
    const BRANDS: &[(&str, &[usize])] = &[
        ("4", &[13, 16, 19]),
        ("51", &[16]),
        ("2221", &[16]),
        ("34", &[15]),
        ("37", &[15]),
        ("6011", &[16, 17, 18, 19]),
        ("3530", &[16, 19]),
        ("36", &[14, 19]),
        ("62", &[16, 19]),
        ("50", &[12, 13, 14, 15, 16, 17, 18, 19]),
        ("9", &[12, 13, 14, 15, 16, 17, 18, 19]),
    ];

    fn check_digit_token(pan: &Pan, token: &Token, format: TokenFormat) {
        let t = token.as_str();
        assert_eq!(t.len(), pan.len(), "length kept");
        assert!(t.bytes().all(|b| b.is_ascii_digit()), "digits only");
        assert!(!luhn_valid(t.as_bytes()), "token must fail Luhn");
        assert_eq!(&t[t.len() - 4..], pan.last4(), "last four kept");
        if format == TokenFormat::Bin6Last4 {
            assert_eq!(&t[..6], pan.bin6(), "BIN kept");
        }
        assert_ne!(t, pan.expose_digits());
        assert!(Token::parse(t).is_some());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn digit_formats_keep_shape_and_fail_luhn(
            brand in 0usize..BRANDS.len(),
            len_pick in 0usize..8,
            filler in proptest::collection::vec(0u8..10, 1..20),
            last4 in any::<bool>(),
        ) {
            let (prefix, lens) = BRANDS[brand];
            let len = lens[len_pick % lens.len()];
            let pan = pan_with(prefix, len, &filler).expect("constructed PAN is valid");
            let format = if last4 { TokenFormat::Last4 } else { TokenFormat::Bin6Last4 };
            let mut cands = candidates(format, &pan);
            let token = cands.next().expect("fresh space has candidates");
            check_digit_token(&pan, &token, format);
        }

        #[test]
        fn opaque_tokens_are_url_safe(filler in proptest::collection::vec(0u8..10, 1..20)) {
            let pan = pan_with("4", 16, &filler).unwrap();
            let t = candidates(TokenFormat::Opaque, &pan).next().unwrap();
            prop_assert!(t.as_str().starts_with("tok_"));
            prop_assert_eq!(t.as_str().len(), 4 + 22);
            prop_assert!(Token::parse(t.as_str()).is_some());
            prop_assert!(!t.as_str().contains(pan.last4()) || t.as_str().len() == 26);
        }

        #[test]
        fn token_parse_never_accepts_a_luhn_valid_number(s in "[0-9]{12,19}") {
            prop_assert_eq!(Token::parse(&s).is_some(), !luhn_valid(s.as_bytes()));
        }
    }

    #[test]
    fn every_length_12_to_19() {
        for len in 12..=19 {
            let pan = pan_with("9", len, &[3, 1, 4, 1, 5]).unwrap();
            for format in [TokenFormat::Bin6Last4, TokenFormat::Last4] {
                for token in candidates(format, &pan).take(50) {
                    check_digit_token(&pan, &token, format);
                }
            }
        }
    }

    #[test]
    fn small_space_is_enumerated_exactly() {
        // 12 digits, BIN6 + last4 leaves 2 random digits: 100 fillings, 90 fail Luhn.
        let pan = pan_with("9", 12, &[7]).unwrap();
        let all: Vec<Token> = candidates(TokenFormat::Bin6Last4, &pan).collect();
        assert_eq!(all.len(), 90);
        let distinct: HashSet<_> = all.iter().map(|t| t.as_str().to_owned()).collect();
        assert_eq!(distinct.len(), 90);
        for t in &all {
            check_digit_token(&pan, t, TokenFormat::Bin6Last4);
        }
    }

    #[test]
    fn random_tokens_differ() {
        let pan = Pan::parse("4111111111111111").unwrap();
        let a: HashSet<String> = (0..200)
            .filter_map(|_| candidates(TokenFormat::Bin6Last4, &pan).next())
            .map(|t| t.as_str().to_owned())
            .collect();
        assert!(a.len() > 190, "tokens are random, got {} distinct of 200", a.len());
    }

    #[test]
    fn random_digits_are_uniform_at_every_position() {
        // 4 000 tokens of a 16-digit PAN kept as BIN + last four: 6 random digits
        // each. Every digit value at every position is expected 400 times (sd ≈ 19);
        // a seed reused or a digit drawn from a skewed source leaves this band.
        let pan = Pan::parse("4111111111111111").unwrap();
        let mut counts = [[0u32; 10]; 6];
        for _ in 0..4_000 {
            let t = candidates(TokenFormat::Bin6Last4, &pan).next().unwrap();
            for (pos, b) in t.as_str().as_bytes()[6..12].iter().enumerate() {
                counts[pos][usize::from(b - b'0')] += 1;
            }
        }
        for (pos, row) in counts.iter().enumerate() {
            for (digit, n) in row.iter().enumerate() {
                assert!((300..=500).contains(n), "digit {digit} at position {pos}: {n} of 4000");
            }
        }
    }

    #[test]
    fn parse_rejects_malformed() {
        assert!(
            Token::parse("4111111111111111").is_none(),
            "a valid PAN is never a token"
        );
        assert!(Token::parse("tok_short").is_none());
        assert!(Token::parse("tok_AAAAAAAAAAAAAAAAAAAA/A").is_none());
        assert!(Token::parse("411111111111111a").is_none());
        assert!(Token::parse("41111111111").is_none());
    }
}
