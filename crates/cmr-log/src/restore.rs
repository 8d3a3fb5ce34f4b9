//! The note a log signs when it was restored from a backup (docs/formats.md "Restore notes").
//!
//! A restore takes a log back to the size of the backup's checkpoint: entries a client saw past it are
//! gone. The restored log says so in a note signed with the log key, so a client that finds the log
//! shorter than it saw (or forked from it) can tell its user why; it still refuses the log. The note's
//! first line is not a log origin, so it never opens as a checkpoint.

use cmr_core::merkle::Hash;

use crate::note::{Note, NoteVerifier};

/// The first line of the note a restore signs: not a log origin, so it never opens as a checkpoint.
pub const FIRST_LINE: &str = "cmr-vault restore";

/// A restore, as the restored store states it to clients (`GET /v1/log/restore`): a note signed with
/// the log key naming the size the log went back to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    /// The size of the log the snapshot held.
    pub size: u64,
    /// Its root.
    pub root: Hash,
    /// When the restore ran, Unix seconds.
    pub time: u64,
}

impl Restored {
    /// The note's text.
    pub fn text(&self, origin: &str) -> String {
        format!(
            "{FIRST_LINE}\norigin {origin}\nsize {}\nroot {}\ntime {}\n",
            self.size,
            hex::encode(self.root),
            self.time
        )
    }

    /// Opens a restore note signed by `log`.
    pub fn open(note: &str, log: &NoteVerifier) -> Result<Self, String> {
        let parsed = Note::parse(note).map_err(|e| e.to_string())?;
        parsed
            .verify(std::slice::from_ref(log))
            .map_err(|e| e.to_string())?;
        let mut lines = parsed.text.lines();
        let mut field = |name: &str| {
            lines
                .next()
                .and_then(|l| l.strip_prefix(name))
                .map(str::to_owned)
                .ok_or_else(|| format!("a restore note names its {}", name.trim()))
        };
        if !field(FIRST_LINE)?.is_empty() {
            return Err("not a restore note".into());
        }
        if field("origin ")? != log.name() {
            return Err("a restore note of another log".into());
        }
        let number = |s: String| s.parse::<u64>().map_err(|e| e.to_string());
        let size = number(field("size ")?)?;
        let root = hex::decode(field("root ")?)
            .ok()
            .and_then(|r| Hash::try_from(r).ok())
            .ok_or("a restore note's root")?;
        let time = number(field("time ")?)?;
        Ok(Restored { size, root, time })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.
    use super::*;
    use crate::note::{NoteSigner, TYPE_ED25519, sign};

    fn signer(seed: u8) -> NoteSigner {
        NoteSigner::new(
            "log.test",
            TYPE_ED25519,
            cmr_core::keys::SigningKey::from_seed(&[seed; 32]),
        )
        .unwrap()
    }

    fn restored() -> Restored {
        Restored {
            size: 42,
            root: [5; 32],
            time: 1_800_000_000,
        }
    }

    #[test]
    fn a_restore_note_opens_under_its_log_key_only_and_never_as_a_checkpoint() {
        let log = signer(1);
        let note = sign(&restored().text(log.name()), &[&log], 0).unwrap();
        assert_eq!(Restored::open(&note, &log.verifier()).unwrap(), restored());
        // Another key, another log's name, a changed size: refused.
        assert!(Restored::open(&note, &signer(2).verifier()).is_err());
        let foreign = sign(&restored().text("other.test"), &[&log], 0).unwrap();
        assert!(Restored::open(&foreign, &log.verifier()).is_err());
        assert!(Restored::open(&note.replace("size 42", "size 43"), &log.verifier()).is_err());
        // A checkpoint is not a restore note, and a restore note is not a checkpoint.
        let cp = crate::checkpoint::Checkpoint {
            origin: log.name().into(),
            size: 42,
            root: [5; 32],
            extensions: Vec::new(),
        }
        .sign(&log);
        assert!(Restored::open(&cp, &log.verifier()).is_err());
        assert!(crate::checkpoint::open(&note, &log.verifier(), &[], 0).is_err());
    }
}
