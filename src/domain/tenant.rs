//! Tenant (merchant) identifiers.

use std::fmt;

/// A tenant id: 1–64 characters of `[A-Za-z0-9._-]`. The restricted alphabet keeps
/// tenant ids safe to use in store keys, HKDF info strings and log fields.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TenantId(String);

impl TenantId {
    /// Parses a tenant id; `None` if it is empty, too long or has other characters.
    pub fn parse(s: &str) -> Option<TenantId> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        ok.then(|| TenantId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TenantId({})", self.0)
    }
}

impl fmt::Display for TenantId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_and_rejects() {
        assert!(TenantId::parse("default").is_some());
        assert!(TenantId::parse("acme-eu.1_x").is_some());
        assert!(TenantId::parse("").is_none());
        assert!(TenantId::parse("a/b").is_none());
        assert!(TenantId::parse("a\0b").is_none());
        assert!(TenantId::parse(&"x".repeat(65)).is_none());
    }
}
