//! Split knowledge for the sealed root key: Shamir secret sharing over GF(256)
//! (the `blahaj` crate, the maintained fork of `sharks` that fixes its biased
//! polynomial coefficients, RUSTSEC-2024-0398) among N custodians, any M of whom
//! can rebuild the root. The share format is unchanged: x byte then y bytes, as
//! `sharks` wrote them, so shares issued before the move still unseal (a test
//! keeps a set issued by `sharks`).
//!
//! A share's text form is `tvs1.<base64url bytes>.<checksum>`; the checksum
//! (first 4 bytes of SHA-256) catches typos before a share is used, so a
//! mistyped share is refused on its own instead of spoiling an unseal.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::crypto::Key256;

const PREFIX: &str = "tvs1";

/// Why shares could not be used. Never includes share material.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShareError {
    #[error("not a tokenvault key share (malformed or mistyped)")]
    Malformed,
    #[error("threshold must be at least 2 and at most the number of shares (max 255)")]
    Parameters,
    #[error("not enough distinct shares")]
    TooFew,
}

/// One custodian's share of the root key. Zeroized on drop; `Debug` shows only its index.
#[derive(Clone)]
pub struct Share(Zeroizing<Vec<u8>>);

impl fmt::Debug for Share {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Share(#{}, [REDACTED])", self.index())
    }
}

impl Share {
    /// Parses the text form (surrounding whitespace ignored).
    pub fn parse(text: &str) -> Result<Share, ShareError> {
        let mut parts = text.trim().split('.');
        let (Some(PREFIX), Some(body), Some(check), None) = (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(ShareError::Malformed);
        };
        let bytes = Zeroizing::new(B64URL.decode(body).map_err(|_| ShareError::Malformed)?);
        if bytes.len() != 33 || bytes[0] == 0 || hex::encode(&Sha256::digest(&*bytes)[..4]) != check {
            return Err(ShareError::Malformed);
        }
        Ok(Share(bytes))
    }

    /// The share's x coordinate (1–255): two shares with the same index are the same share.
    pub fn index(&self) -> u8 {
        self.0.first().copied().unwrap_or(0)
    }

    /// The text form, to hand to a custodian once.
    pub fn encode(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{PREFIX}.{}.{}",
            B64URL.encode(&*self.0),
            hex::encode(&Sha256::digest(&*self.0)[..4])
        ))
    }
}

/// Splits `root` into `n` shares, any `threshold` of which rebuild it.
pub fn split(root: &Key256, threshold: u8, n: u8) -> Result<Vec<Share>, ShareError> {
    if threshold < 2 || threshold > n {
        return Err(ShareError::Parameters);
    }
    let dealer = blahaj::Sharks(threshold).dealer_rng(root.expose_bytes(), &mut OsEntropy);
    Ok(dealer
        .take(usize::from(n))
        .map(|s| Share(Zeroizing::new(Vec::from(&s))))
        .collect())
}

/// The operating system's entropy source, for `blahaj`'s RNG interface: every
/// polynomial coefficient comes straight from the OS (no user-space generator).
struct OsEntropy;

impl rand_core_010::TryRng for OsEntropy {
    type Error = rand_core_010::Infallible;

    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::RngCore::next_u32(&mut rand::rngs::OsRng))
    }

    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::RngCore::next_u64(&mut rand::rngs::OsRng))
    }

    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, dst);
        Ok(())
    }
}

impl rand_core_010::TryCryptoRng for OsEntropy {}

/// Rebuilds the root from at least `threshold` distinct shares. A wrong share
/// yields a wrong key, which the keystore's MAC then refuses.
pub fn combine(shares: &[Share], threshold: u8) -> Result<Key256, ShareError> {
    let mut seen = std::collections::BTreeSet::new();
    let distinct: Vec<blahaj::Share> = shares
        .iter()
        .filter(|s| seen.insert(s.index()))
        .map(|s| blahaj::Share::try_from(s.0.as_slice()).map_err(|_| ShareError::Malformed))
        .collect::<Result<_, _>>()?;
    if distinct.len() < usize::from(threshold) {
        return Err(ShareError::TooFew);
    }
    let secret = Zeroizing::new(
        blahaj::Sharks(threshold)
            .recover(distinct.iter())
            .map_err(|_| ShareError::TooFew)?,
    );
    Key256::from_slice(&secret).ok_or(ShareError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_threshold_subset_rebuilds_the_root() {
        let root = Key256::random();
        let shares = split(&root, 3, 5).unwrap();
        assert_eq!(shares.len(), 5);
        for combo in [[0, 1, 2], [0, 2, 4], [4, 3, 1], [1, 2, 3]] {
            let subset: Vec<Share> = combo.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(combine(&subset, 3).unwrap(), root);
        }
        // Text round trip.
        let text = shares[0].encode();
        assert_eq!(Share::parse(&format!("  {}\n", &*text)).unwrap().0, shares[0].0);
    }

    /// Shares issued by the `sharks` crate before the move to `blahaj` (root key
    /// 32 × 0x42, 2 of 3) still rebuild the root: the format did not change.
    #[test]
    fn shares_issued_by_sharks_still_unseal() {
        let issued = [
            "tvs1.AVqslmq6IAWqnRYXQ7Ll9UcT-m-QIdxM70DzIQlEhQOK.2703075f",
            "tvs1.AnKD9xKvhsyP4eroQL8RMUjgLxj7hGNeBUY9hNRO0cDP.2e39a0a5",
            "tvs1.A2ptIzpX5ItnPr69QU-2hk2xlzUp5_1QqESM559IFoEH.63641abf",
        ];
        let shares: Vec<Share> = issued.iter().map(|t| Share::parse(t).unwrap()).collect();
        let root = Key256::from_slice(&[0x42; 32]).unwrap();
        for pair in [[0, 1], [0, 2], [1, 2]] {
            let subset: Vec<Share> = pair.iter().map(|&i| shares[i].clone()).collect();
            assert_eq!(combine(&subset, 2).unwrap(), root);
        }
    }

    #[test]
    fn too_few_duplicated_or_mistyped_shares_fail() {
        let root = Key256::random();
        let shares = split(&root, 3, 5).unwrap();
        assert_eq!(combine(&shares[..2], 3).unwrap_err(), ShareError::TooFew);
        let dup = vec![shares[0].clone(), shares[0].clone(), shares[1].clone()];
        assert_eq!(combine(&dup, 3).unwrap_err(), ShareError::TooFew);
        // A share from another split combines to a wrong key (caught later by the keystore MAC).
        let other = split(&Key256::random(), 3, 5).unwrap();
        let mixed = vec![shares[0].clone(), shares[1].clone(), other[2].clone()];
        assert_ne!(combine(&mixed, 3).unwrap(), root);
        // A typo is caught by the checksum.
        let mut text = shares[0].encode().to_string();
        let i = text.len() / 2;
        let c = if &text[i..=i] == "A" { "B" } else { "A" };
        text.replace_range(i..=i, c);
        assert_eq!(Share::parse(&text).unwrap_err(), ShareError::Malformed);
        assert_eq!(split(&root, 1, 3).unwrap_err(), ShareError::Parameters);
        assert_eq!(split(&root, 4, 3).unwrap_err(), ShareError::Parameters);
        assert!(!format!("{:?}", shares[0]).contains(&shares[0].encode()[5..15]));
    }
}
