//! Auditor admission: the operator's signed word that an auditor may read entry bodies
//! (docs/design/0005-auditor-admission.md).
//!
//! An auditor registers an identity like anyone, and that gives it nothing. The operator admits it with an
//! admission statement: a C2SP signed note, signed with the log key (which the operator keeps outside
//! the data folder and every client pins), logged as an entry of its own so that every auditor and every
//! customer can see who is one and since when. A dismissal is the same statement with `dismiss`.
//!
//! The note text, three lines:
//!
//! ```text
//! cmr-vault auditor admission v1
//! admit 3f1a…(the auditor's id, 64 hex digits)
//! time 1767225600
//! ```
//!
//! Its second line is never a decimal number, so it can never be read as a checkpoint signed by the same
//! key, and a checkpoint's second line (a size) is never `admit` or `dismiss`.
//!
//! [`Auditors`] holds the rule, applied in one place by the sequencer, the replay at open, the auditor
//! and the SDK: only an identity registered as an auditor is admitted; a statement changes the state
//! (admit an auditor not admitted, dismiss one admitted); and its time is later than the previous
//! statement about that auditor, so an old statement cannot be played back out of order.

use std::collections::BTreeMap;

use cmr_core::identity::{IdentityId, Role};
use thiserror::Error;

use crate::note::{self, Note, NoteSigner, NoteVerifier};

/// The first line of every admission statement.
pub const HEADER: &str = "cmr-vault auditor admission v1";

/// An admission statement is refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AdmissionError {
    /// The note does not parse, or its text is not exactly the canonical three lines.
    #[error("malformed admission statement: {0}")]
    Malformed(&'static str),
    /// It is not signed by the log key.
    #[error("the admission statement is not signed by this log's key")]
    NotSigned,
    /// The identity is unknown, or not registered as an auditor.
    #[error("{0} is not a registered auditor identity")]
    NotAnAuditor(IdentityId),
    /// It changes nothing (admits an admitted auditor, dismisses one that is not).
    #[error("{0} is already {1}")]
    NoChange(IdentityId, &'static str),
    /// Its time is not after the previous statement about the same auditor.
    #[error("the statement's time {time} is not after the previous one's ({previous})")]
    OutOfOrder {
        /// This statement's time.
        time: u64,
        /// The previous one's.
        previous: u64,
    },
}

/// What an admission statement says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    /// The auditor.
    pub auditor: IdentityId,
    /// Admitted (`true`) or dismissed.
    pub admit: bool,
    /// When the operator signed it, Unix seconds.
    pub time: u64,
}

impl Admission {
    /// The canonical note text.
    pub fn text(&self) -> String {
        let verb = if self.admit { "admit" } else { "dismiss" };
        format!(
            "{HEADER}\n{verb} {}\ntime {}\n",
            self.auditor.to_hex(),
            self.time
        )
    }

    /// The statement signed with the log key.
    pub fn sign(&self, log_key: &NoteSigner) -> String {
        // The text ends in exactly one newline, which is all `note::sign` can refuse.
        note::sign(&self.text(), &[log_key], 0).unwrap_or_default()
    }

    /// Opens a signed statement: canonical text, signed by `log_key`.
    pub fn open(signed: &str, log_key: &NoteVerifier) -> Result<Self, AdmissionError> {
        let note =
            Note::parse(signed).map_err(|_| AdmissionError::Malformed("not a signed note"))?;
        note.verify(std::slice::from_ref(log_key))
            .map_err(|_| AdmissionError::NotSigned)?;
        let parsed = Self::parse_text(&note.text)?;
        if parsed.text() != note.text {
            return Err(AdmissionError::Malformed("not in canonical form"));
        }
        Ok(parsed)
    }

    fn parse_text(text: &str) -> Result<Self, AdmissionError> {
        let mut lines = text.lines();
        if lines.next() != Some(HEADER) {
            return Err(AdmissionError::Malformed("not an auditor admission"));
        }
        let (verb, id) = lines
            .next()
            .and_then(|l| l.split_once(' '))
            .ok_or(AdmissionError::Malformed("no second line"))?;
        let admit = match verb {
            "admit" => true,
            "dismiss" => false,
            _ => return Err(AdmissionError::Malformed("neither admit nor dismiss")),
        };
        let auditor =
            IdentityId::from_hex(id).ok_or(AdmissionError::Malformed("not an identity id"))?;
        let time = lines
            .next()
            .and_then(|l| l.strip_prefix("time "))
            .and_then(|t| t.parse().ok())
            .ok_or(AdmissionError::Malformed("no time line"))?;
        if lines.next().is_some() {
            return Err(AdmissionError::Malformed("more than three lines"));
        }
        Ok(Self {
            auditor,
            admit,
            time,
        })
    }
}

/// One auditor's standing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Standing {
    /// Admitted now.
    pub admitted: bool,
    /// The log index of the statement that made it so.
    pub since: u64,
    /// That statement's time.
    pub time: u64,
}

/// Who is an auditor, folded from the admission entries in log order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Auditors {
    standing: BTreeMap<IdentityId, Standing>,
}

impl Auditors {
    /// Applies a statement logged at `index`; `role` is the auditor identity's registered role at that
    /// position (`None` if it is unknown). Checks everything before it changes anything.
    pub fn apply(
        &mut self,
        a: &Admission,
        role: Option<Role>,
        index: u64,
    ) -> Result<(), AdmissionError> {
        if role != Some(Role::Auditor) {
            return Err(AdmissionError::NotAnAuditor(a.auditor));
        }
        if let Some(s) = self.standing.get(&a.auditor) {
            if a.time <= s.time {
                return Err(AdmissionError::OutOfOrder {
                    time: a.time,
                    previous: s.time,
                });
            }
            if s.admitted == a.admit {
                return Err(AdmissionError::NoChange(a.auditor, state_word(a.admit)));
            }
        } else if !a.admit {
            return Err(AdmissionError::NoChange(a.auditor, state_word(false)));
        }
        self.standing.insert(
            a.auditor,
            Standing {
                admitted: a.admit,
                since: index,
                time: a.time,
            },
        );
        Ok(())
    }

    /// Whether `id` is admitted now.
    pub fn is_admitted(&self, id: &IdentityId) -> bool {
        self.standing.get(id).is_some_and(|s| s.admitted)
    }

    /// Every auditor ever admitted, with its current standing.
    pub fn all(&self) -> impl Iterator<Item = (&IdentityId, &Standing)> {
        self.standing.iter()
    }
}

fn state_word(admit: bool) -> &'static str {
    if admit { "admitted" } else { "not admitted" }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cmr_core::keys::SigningKey;

    fn key(seed: u8) -> NoteSigner {
        NoteSigner::new(
            "vault.example",
            note::TYPE_ED25519,
            SigningKey::from_seed(&[seed; 32]),
        )
        .unwrap()
    }

    fn adm(admit: bool, time: u64) -> Admission {
        Admission {
            auditor: IdentityId([7; 32]),
            admit,
            time,
        }
    }

    #[test]
    fn a_signed_statement_opens_to_what_was_signed() {
        let k = key(1);
        let a = adm(true, 100);
        assert_eq!(Admission::open(&a.sign(&k), &k.verifier()), Ok(a));
        let d = adm(false, 101);
        assert_eq!(Admission::open(&d.sign(&k), &k.verifier()), Ok(d));
    }

    #[test]
    fn another_key_or_an_edited_text_is_refused() {
        let (k, other) = (key(1), key(2));
        let signed = adm(true, 100).sign(&k);
        assert_eq!(
            Admission::open(&signed, &other.verifier()),
            Err(AdmissionError::NotSigned)
        );
        let edited = signed.replace("admit ", "dismiss ");
        assert_eq!(
            Admission::open(&edited, &k.verifier()),
            Err(AdmissionError::NotSigned)
        );
        // Signed, but not canonical: a leading zero in the time.
        let odd = note::sign(
            &format!(
                "{HEADER}\nadmit {}\ntime 0100\n",
                IdentityId([7; 32]).to_hex()
            ),
            &[&k],
            0,
        )
        .unwrap();
        assert!(matches!(
            Admission::open(&odd, &k.verifier()),
            Err(AdmissionError::Malformed(_))
        ));
    }

    #[test]
    fn a_checkpoint_signed_by_the_log_key_is_not_an_admission() {
        let k = key(1);
        let cp = note::sign("vault.example\n5\nAAAA\n", &[&k], 0).unwrap();
        assert!(matches!(
            Admission::open(&cp, &k.verifier()),
            Err(AdmissionError::Malformed(_))
        ));
        let signed = adm(true, 100).sign(&k);
        let text = &signed[..signed.find("\n\n").unwrap() + 1];
        assert!(crate::checkpoint::Checkpoint::parse_text(text).is_err());
    }

    #[test]
    fn the_rule_admits_auditors_only_changes_state_and_keeps_time_order() {
        let mut s = Auditors::default();
        let id = IdentityId([7; 32]);
        assert_eq!(
            s.apply(&adm(true, 100), Some(Role::Company), 0),
            Err(AdmissionError::NotAnAuditor(id))
        );
        assert_eq!(
            s.apply(&adm(true, 100), None, 0),
            Err(AdmissionError::NotAnAuditor(id))
        );
        assert!(matches!(
            s.apply(&adm(false, 100), Some(Role::Auditor), 0),
            Err(AdmissionError::NoChange(..))
        ));
        s.apply(&adm(true, 100), Some(Role::Auditor), 3).unwrap();
        assert!(s.is_admitted(&id));
        assert!(matches!(
            s.apply(&adm(true, 200), Some(Role::Auditor), 4),
            Err(AdmissionError::NoChange(..))
        ));
        // An older dismissal played back after the admission is refused.
        assert!(matches!(
            s.apply(&adm(false, 90), Some(Role::Auditor), 4),
            Err(AdmissionError::OutOfOrder { .. })
        ));
        assert!(s.is_admitted(&id));
        s.apply(&adm(false, 150), Some(Role::Auditor), 5).unwrap();
        assert!(!s.is_admitted(&id));
        let (_, standing) = s.all().next().unwrap();
        assert_eq!((standing.since, standing.time), (5, 150));
    }
}
