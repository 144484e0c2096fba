//! The images soul pulled for this state dir's stack (`pulled.json`, a sorted JSON list of the
//! references pulled): what `soul status` may call unused and `soul prune` or `soul down
//! --images` may remove. An image soul did not pull (built, imported, pulled by another tool
//! before soul needed it) is never recorded, so never removed.

use std::collections::BTreeSet;

use super::StateDir;
use super::layout::PULLED_FILE;

impl StateDir {
    /// The references soul pulled, as recorded.
    pub fn pulled(&self) -> BTreeSet<String> {
        self.read(PULLED_FILE)
            .ok()
            .and_then(|bytes| serde_json::from_slice(&bytes).ok())
            .unwrap_or_default()
    }

    /// Records that soul pulled `reference`.
    pub fn record_pulled(&self, reference: &str) -> std::io::Result<()> {
        let mut pulled = self.pulled();
        if pulled.insert(reference.to_string()) {
            self.write_pulled(&pulled)?;
        }
        Ok(())
    }

    /// Forgets references whose images are gone (removed by soul, or by anyone).
    pub fn forget_pulled(&self, gone: &[String]) -> std::io::Result<()> {
        let mut pulled = self.pulled();
        let before = pulled.len();
        pulled.retain(|r| !gone.contains(r));
        if pulled.len() != before {
            self.write_pulled(&pulled)?;
        }
        Ok(())
    }

    fn write_pulled(&self, pulled: &BTreeSet<String>) -> std::io::Result<()> {
        if pulled.is_empty() {
            return self.remove(PULLED_FILE);
        }
        let mut bytes = serde_json::to_vec_pretty(pulled).unwrap_or_default();
        bytes.push(b'\n');
        self.write(PULLED_FILE, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pulled_images_are_recorded_once_and_forgotten_when_gone() {
        let dir = tempfile::tempdir().unwrap();
        let state = StateDir::at(dir.path());
        assert!(state.pulled().is_empty());
        state.record_pulled("r.example/b@sha256:22").unwrap();
        state.record_pulled("r.example/a:1").unwrap();
        state.record_pulled("r.example/a:1").unwrap();
        assert_eq!(
            state.pulled().into_iter().collect::<Vec<_>>(),
            ["r.example/a:1", "r.example/b@sha256:22"]
        );
        state.forget_pulled(&["r.example/a:1".into()]).unwrap();
        assert_eq!(state.pulled().len(), 1);
        state
            .forget_pulled(&["r.example/b@sha256:22".into()])
            .unwrap();
        assert!(!dir.path().join(PULLED_FILE).exists());
    }
}
