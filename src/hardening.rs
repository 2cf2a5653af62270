//! Process hardening at start: no core dumps (a dump would hold keys and card
//! data), optional `mlockall` (keep secrets out of swap), and no running as root
//! in production unless explicitly allowed.

use crate::config::{Mode, Settings};

/// Why the process refused to start.
#[derive(Debug, thiserror::Error)]
pub enum HardeningError {
    #[error("refusing to run as root in production; run as an unprivileged user or set allow_root = true")]
    Root,
    #[error("mlockall was requested but failed: {0} (raise RLIMIT_MEMLOCK or grant CAP_IPC_LOCK)")]
    Mlock(String),
    #[error("cannot disable core dumps: {0}")]
    Dumpable(String),
}

/// Applies the hardening `settings` ask for; returns what was done, for the log.
pub fn apply(settings: &Settings) -> Result<Vec<&'static str>, HardeningError> {
    let mut done = Vec::new();
    if settings.mode == Mode::Production && rustix::process::getuid().is_root() && !settings.allow_root {
        return Err(HardeningError::Root);
    }
    rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
        .map_err(|e| HardeningError::Dumpable(e.to_string()))?;
    done.push("core dumps disabled (PR_SET_DUMPABLE=0)");
    if settings.mlockall {
        rustix::mm::mlockall(rustix::mm::MlockAllFlags::CURRENT | rustix::mm::MlockAllFlags::FUTURE)
            .map_err(|e| HardeningError::Mlock(e.to_string()))?;
        done.push("memory locked (mlockall)");
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disables_core_dumps_and_guards_root() {
        let (mut settings, _) =
            crate::dev::settings_for(std::path::Path::new("/nonexistent"), "127.0.0.1:0".parse().unwrap());
        let done = apply(&settings).unwrap();
        assert!(done.iter().any(|d| d.contains("core dumps disabled")));
        assert_eq!(
            rustix::process::dumpable_behavior().unwrap(),
            rustix::process::DumpableBehavior::NotDumpable
        );
        settings.mode = Mode::Production;
        settings.allow_root = false;
        let as_root = rustix::process::getuid().is_root();
        assert_eq!(matches!(apply(&settings), Err(HardeningError::Root)), as_root);
        settings.allow_root = true;
        assert!(apply(&settings).is_ok());
    }
}
