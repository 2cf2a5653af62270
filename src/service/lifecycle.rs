//! A card's life after tokenize: its uses (`last_used_at`), retention of cards
//! not used for a tenant's period (PCI DSS 3.2.1), and the tenant listing CRM and
//! recurring billing page through (cards expiring before a month).

use std::time::Duration;

use time::OffsetDateTime;

use super::{TokenMetadata, Vault, VaultError, metadata};
use crate::audit::AuditEvent;
use crate::domain::tenant::TenantId;
use crate::domain::token::Token;

/// Who the retention sweeper's deletions are recorded as.
pub const RETENTION_PRINCIPAL: &str = "system:retention";

/// Records a listing page reads at most while filtering (a page may hold fewer
/// items than asked, with a cursor: the caller goes on).
const LIST_SCAN: usize = 2_000;
/// Records the retention sweeper reads per store call.
const RETENTION_PAGE: usize = 500;

/// One page of a tenant's token metadata.
#[derive(Debug)]
pub struct TokenPage {
    pub items: Vec<TokenMetadata>,
    /// Where the next page starts (`None`: this was the last).
    pub next: Option<Token>,
}

impl Vault {
    /// The token lifetime bounds and retention periods this vault enforces.
    pub fn lifecycle(&self) -> &crate::config::Lifecycle {
        &self.lifecycle
    }

    /// How precisely uses are recorded (seconds): a card used often costs one
    /// write per this long. An eighth of the shortest retention period, between
    /// 1 s and 1 h.
    pub(crate) fn use_granularity(&self) -> i64 {
        let shortest = self.lifecycle.retention.values().min().copied();
        shortest.map_or(3_600, |d| (d / 8).as_secs().clamp(1, 3_600)) as i64
    }

    /// How often the retention sweeper runs (`None`: no tenant has a period): a
    /// quarter of the shortest period, between 1 s and 1 h.
    pub fn retention_interval(&self) -> Option<Duration> {
        let shortest = self.lifecycle.retention.values().min().copied()?;
        Some((shortest / 4).clamp(Duration::from_secs(1), Duration::from_secs(3_600)))
    }

    /// Records a use of a card (blocking: call off the async workers). A failure
    /// is logged, never fails the request that used the card.
    pub(crate) fn note_use(&self, tenant: &TenantId, token: &Token) {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        if let Err(e) = self.store.touch(tenant, token, now, self.use_granularity()) {
            tracing::warn!(error = %e, "cannot record a card's use (retention counts from the last recorded one)");
        }
    }

    /// A page of the tenant's token metadata in token order after `after`; with
    /// `expiring_before` (year, month), only cards whose expiry month is earlier.
    /// At most `limit` items, reading at most [`LIST_SCAN`] records: a page may be
    /// short and still have a next one. Opens each card for its expiry inside the
    /// vault (the PAN never leaves); `event` (outcome `ok`, the count in its
    /// detail) is appended durably before the page is returned.
    pub async fn list_tokens(
        &self,
        tenant: TenantId,
        expiring_before: Option<(u16, u8)>,
        after: Option<Token>,
        limit: usize,
        event: AuditEvent,
    ) -> Result<TokenPage, VaultError> {
        let this = self.clone();
        let mut page = tokio::task::spawn_blocking(move || -> Result<TokenPage, VaultError> {
            let ring = this.keys.ring().ok_or(VaultError::Sealed)?;
            let read = if expiring_before.is_some() { LIST_SCAN } else { limit };
            let now = OffsetDateTime::now_utc().unix_timestamp();
            let records = this.store.tenant_records(&tenant, after.as_ref(), read, None)?;
            let mut items = Vec::with_capacity(limit.min(records.len()));
            let mut next = None;
            for (i, (record, used)) in records.iter().enumerate() {
                if items.len() == limit {
                    // Full: the next page starts after the last record taken.
                    next = Some(records[i - 1].0.token.clone());
                    break;
                }
                if record.expired_at(now) {
                    continue;
                }
                let card = ring.open(&tenant, &record.token, &record.metadata_binding(), &record.sealed)?;
                if expiring_before.is_some_and(|before| (card.expiry.year(), card.expiry.month()) >= before) {
                    continue;
                }
                let mut meta = metadata(record, &card);
                meta.last_used_at = Some(*used);
                items.push(meta);
            }
            if next.is_none() && records.len() == read {
                next = records.last().map(|(r, _)| r.token.clone());
            }
            Ok(TokenPage { items, next })
        })
        .await
        .map_err(|_| VaultError::Task)??;
        let listed = AuditEvent {
            outcome: "ok".into(),
            detail: Some(format!("{} tokens listed", page.items.len())),
            ..event
        };
        self.audited(listed).await?;
        for meta in &mut page.items {
            meta.cvv_held = self.cvv.holds(&meta.token).await;
        }
        Ok(page)
    }

    /// Deletes the cards of every tenant with a retention period that were not
    /// used for that long, each with its audit record (`token.retention`, one unit
    /// of work) and its waiting CVV. Returns how many went.
    pub async fn sweep_retention(&self) -> Result<usize, VaultError> {
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let mut gone = 0;
        for (tenant, period) in self.lifecycle.retention.iter() {
            let Some(tenant) = TenantId::parse(tenant) else {
                continue;
            };
            let cutoff = now.saturating_sub(i64::try_from(period.as_secs()).unwrap_or(i64::MAX));
            let mut after: Option<Token> = None;
            loop {
                let (store, t, from) = (self.store.clone(), tenant.clone(), after.clone());
                let unused = tokio::task::spawn_blocking(move || {
                    store.tenant_records(&t, from.as_ref(), RETENTION_PAGE, Some(cutoff))
                })
                .await
                .map_err(|_| VaultError::Task)??;
                let last = unused.last().map(|(r, _)| r.token.clone());
                let n = unused.len();
                for (record, _) in unused {
                    // Used since the scan read it: kept.
                    let (store, t, tok) = (self.store.clone(), tenant.clone(), record.token.clone());
                    let used = tokio::task::spawn_blocking(move || store.last_used(&t, &tok))
                        .await
                        .map_err(|_| VaultError::Task)??;
                    if used.is_none_or(|u| u >= cutoff) {
                        continue;
                    }
                    if self
                        .sweep_one(tenant.clone(), record.token, "token.retention", RETENTION_PRINCIPAL)
                        .await?
                    {
                        gone += 1;
                    }
                }
                if n < RETENTION_PAGE {
                    break;
                }
                after = last;
            }
        }
        Ok(gone)
    }
}
