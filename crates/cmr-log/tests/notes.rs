//! Signed notes and checkpoints: the reference implementation's note byte for byte, and the refusals.
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::keys::SigningKey;
use cmr_log::checkpoint::{self, Checkpoint, CheckpointError};
use cmr_log::note::{
    self, Note, NoteError, NoteSigner, NoteVerifier, TYPE_COSIGNATURE, TYPE_ED25519,
};

fn vector() -> serde_json::Value {
    let p = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/vectors/signed-note/peterneumann.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn reproduces_the_reference_note_byte_for_byte() {
    let v = vector();
    let signer = NoteSigner::from_skey(v["signer_key"].as_str().unwrap()).unwrap();
    assert_eq!(&*signer.to_skey(), v["signer_key"].as_str().unwrap());
    let verifier = NoteVerifier::from_vkey(v["verifier_key"].as_str().unwrap()).unwrap();
    assert_eq!(signer.verifier(), verifier);
    assert_eq!(verifier.to_vkey(), v["verifier_key"].as_str().unwrap());
    let signed = note::sign(v["text"].as_str().unwrap(), &[&signer], 0).unwrap();
    assert_eq!(signed, v["signed_note"].as_str().unwrap());
    let parsed = Note::parse(&signed).unwrap();
    assert_eq!(parsed.text, v["text"].as_str().unwrap());
    parsed.verify(std::slice::from_ref(&verifier)).unwrap();
    // A changed text fails.
    let changed = signed.replacen("cryptography", "cryptographY", 1);
    assert_eq!(
        Note::parse(&changed)
            .unwrap()
            .verify(&[verifier])
            .unwrap_err(),
        NoteError::BadSignature("PeterNeumann".into())
    );
    // The bad verifier keys are refused.
    for bad in v["bad_verifier_keys"].as_array().unwrap() {
        assert!(
            NoteVerifier::from_vkey(bad.as_str().unwrap()).is_err(),
            "{bad}"
        );
    }
}

fn log_signer() -> NoteSigner {
    NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[1; 32]),
    )
    .unwrap()
}

fn witness(i: u8) -> NoteSigner {
    NoteSigner::new(
        &format!("witness.example/w{i}"),
        TYPE_COSIGNATURE,
        SigningKey::from_seed(&[10 + i; 32]),
    )
    .unwrap()
}

fn cp(size: u64) -> Checkpoint {
    Checkpoint {
        origin: "vault.example/log".into(),
        size,
        root: [7; 32],
        extensions: vec![],
    }
}

#[test]
fn checkpoints_sign_open_and_cosign() {
    let log = log_signer();
    let signed = cp(42).sign(&log);
    assert!(signed.starts_with("vault.example/log\n42\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n\n\u{2014} vault.example/log "));
    let v = checkpoint::open(&signed, &log.verifier(), &[], 0).unwrap();
    assert_eq!(v.checkpoint, cp(42));
    // Two witnesses cosign; a client requiring 2 of 3 accepts, 3 of 3 refuses.
    let text = cp(42).text();
    let cosigned = note::add_signature(
        &note::add_signature(&signed, &witness(1).signature_line(&text, 1_900_000_000)),
        &witness(2).signature_line(&text, 1_900_000_001),
    );
    let ws = [
        witness(1).verifier(),
        witness(2).verifier(),
        witness(3).verifier(),
    ];
    let v = checkpoint::open(&cosigned, &log.verifier(), &ws, 2).unwrap();
    assert_eq!(
        v.cosigners,
        vec![
            ("witness.example/w1".into(), 1_900_000_000),
            ("witness.example/w2".into(), 1_900_000_001)
        ]
    );
    assert_eq!(
        checkpoint::open(&cosigned, &log.verifier(), &ws, 3).unwrap_err(),
        CheckpointError::TooFewWitnesses { got: 2, need: 3 }
    );
    // Freshness: recently cosigned, or covering our own entry.
    assert!(checkpoint::is_fresh(&v, None, 0, 1_900_000_100, 300));
    assert!(!checkpoint::is_fresh(&v, None, 0, 1_900_001_000, 300));
    assert!(checkpoint::is_fresh(&v, Some(41), 42, 1_900_001_000, 300));
    assert!(!checkpoint::is_fresh(&v, Some(42), 42, 1_900_001_000, 300));
    assert!(!checkpoint::is_fresh(&v, Some(1), 43, 1_900_001_000, 300));
    // A cosignature's timestamp is signed: editing it breaks the cosignature, which rejects the note.
    let line = witness(1).signature_line(&text, 5);
    let forged = line.replace(&line[line.rfind(' ').unwrap() + 1..], &{
        use base64::Engine as _;
        let mut raw = base64::engine::general_purpose::STANDARD
            .decode(line[line.rfind(' ').unwrap() + 1..].trim())
            .unwrap();
        raw[11] ^= 1;
        format!(
            "{}\n",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    });
    assert!(
        checkpoint::open(
            &note::add_signature(&signed, &forged),
            &log.verifier(),
            &ws,
            1
        )
        .is_err()
    );
}

#[test]
fn unknown_signatures_are_ignored_and_a_note_without_a_known_one_refused() {
    let log = log_signer();
    let other = NoteSigner::new(
        "evil.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[9; 32]),
    )
    .unwrap();
    let signed = note::sign(&cp(5).text(), &[&other, &log], 0).unwrap();
    checkpoint::open(&signed, &log.verifier(), &[], 0).unwrap();
    // Signed only by an unknown key: refused.
    let only_other = note::sign(&cp(5).text(), &[&other], 0).unwrap();
    assert_eq!(
        checkpoint::open(&only_other, &log.verifier(), &[], 0).unwrap_err(),
        CheckpointError::Note(NoteError::NoKnownSignature)
    );
    // Same name, another key (a different key id): ignored, so refused for want of a known signature.
    let impostor = NoteSigner::new(
        "vault.example/log",
        TYPE_ED25519,
        SigningKey::from_seed(&[8; 32]),
    )
    .unwrap();
    let forged = cp(5).sign(&impostor);
    assert!(checkpoint::open(&forged, &log.verifier(), &[], 0).is_err());
    // A witness cosignature alone is not a log signature.
    let text = cp(5).text();
    let w = witness(1);
    let only_witness = format!("{text}\n{}", w.signature_line(&text, 1));
    assert_eq!(
        checkpoint::open(&only_witness, &log.verifier(), &[w.verifier()], 0).unwrap_err(),
        CheckpointError::NotSignedByLog
    );
    // Another origin.
    let elsewhere = Checkpoint {
        origin: "other.example/log".into(),
        ..cp(5)
    }
    .sign(&log);
    assert!(matches!(
        checkpoint::open(&elsewhere, &log.verifier(), &[], 0).unwrap_err(),
        CheckpointError::WrongOrigin(_)
    ));
}

#[test]
fn malformed_notes_and_checkpoints() {
    for bad in [
        "",
        "text\n",
        "text\n\n",
        "text\n\nno dash line\n",
        "text\n\n\u{2014} name\n",
        "text\n\n\u{2014} name !!!notbase64\n",
        "text\n\n\u{2014} na+me AAAAAAAA\n",
        "te\u{7}xt\n\n\u{2014} name AAAAAAAA\n",
        "text\n\n\u{2014} name AAAAAAAA",
    ] {
        assert!(Note::parse(bad).is_err(), "{bad:?}");
    }
    for bad in [
        "o\n01\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
        "o\n1\nshort\n",
        "\n1\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
        "o\n-1\nBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=\n",
        "o\n1\n",
    ] {
        assert!(Checkpoint::parse_text(bad).is_err(), "{bad:?}");
    }
    assert!(NoteVerifier::from_vkey("name+zzzzzzzz+AQ==").is_err());
    assert!(NoteSigner::from_skey("name+00000000+AQ==").is_err());
    assert!(note::sign("no newline", &[&log_signer()], 0).is_err());
    assert!(!format!("{:?}", log_signer()).contains(&hex::encode([1u8; 32])));
}

proptest::proptest! {
    #[test]
    fn note_parsing_never_panics(s in "\\PC{0,300}") {
        let _ = Note::parse(&s);
        let _ = Checkpoint::parse_text(&s);
        let _ = NoteVerifier::from_vkey(&s);
    }
}
