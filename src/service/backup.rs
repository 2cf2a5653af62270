//! Online backups: the store copied at one instant into an unnamed spool file,
//! then streamed to the operator (`tokenvault backup`).

use std::io::{Seek, SeekFrom};

use super::{Vault, VaultError};
use crate::store::backup::Summary;

/// A backup ready to be streamed: an unnamed file (gone once closed) at its start.
pub struct BackupFile {
    pub file: std::fs::File,
    pub summary: Summary,
    pub bytes: u64,
}

impl Vault {
    /// Takes a backup of the store and keystore. `Ok(None)`: this backend is
    /// backed up with its own tools (PostgreSQL).
    pub async fn backup(&self) -> Result<Option<BackupFile>, VaultError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut file = tempfile::tempfile_in(&*this.spool_dir).map_err(|e| {
                VaultError::Store(crate::store::StoreError::Backend(format!(
                    "cannot create the backup spool in {}: {e}",
                    this.spool_dir.display()
                )))
            })?;
            let keystore = || {
                this.keys
                    .keystore_bytes()
                    .map_err(|e| Box::new(e) as crate::store::BoxError)
            };
            let Some((summary, bytes)) = this.store.backup(&mut file, &keystore)? else {
                return Ok(None);
            };
            file.seek(SeekFrom::Start(0))
                .map_err(|e| VaultError::Store(crate::store::StoreError::io("backup spool", e)))?;
            Ok(Some(BackupFile { file, summary, bytes }))
        })
        .await
        .map_err(|_| VaultError::Task)?
    }
}
