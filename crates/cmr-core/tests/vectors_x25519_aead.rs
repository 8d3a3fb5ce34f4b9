//! Wycheproof X25519 through our KEM key types (low-order keys refused), and Wycheproof ChaCha20-Poly1305
//! (ring, which seals records) and XChaCha20-Poly1305 (the `chacha20poly1305` crate, which seals key files).
#![allow(clippy::unwrap_used)] // Test code: a panic is a failed test.

use cmr_core::keys::{KemPublicKey, KemSecretKey};
use wycheproof::TestResult;

#[test]
fn wycheproof_x25519_low_order_refused() {
    use wycheproof::xdh::{TestFlag, TestName, TestSet};
    let set = TestSet::load(TestName::X25519).unwrap();
    let mut refused_low_order = 0;
    for group in &set.test_groups {
        for t in &group.tests {
            let sk: [u8; 32] = t.private_key.as_ref().try_into().unwrap();
            let sk = KemSecretKey::from_bytes(sk);
            let public = KemPublicKey::from_slice(&t.public_key);
            let shared = public.and_then(|pk| sk.agree(&pk.to_bytes()));
            let low_order = t.flags.contains(&TestFlag::LowOrderPublic)
                || t.flags.contains(&TestFlag::ZeroSharedSecret)
                || t.shared_secret.iter().all(|b| *b == 0);
            if low_order {
                assert!(shared.is_err(), "tc {} low-order key accepted", t.tc_id);
                refused_low_order += 1;
                continue;
            }
            match (t.result, shared) {
                (TestResult::Valid | TestResult::Acceptable, Ok(s)) => {
                    assert_eq!(&s[..], &t.shared_secret[..], "tc {}", t.tc_id)
                }
                (TestResult::Valid, Err(e)) => panic!("tc {} refused: {e}", t.tc_id),
                (TestResult::Invalid, Ok(_)) => panic!("tc {} accepted", t.tc_id),
                (TestResult::Acceptable | TestResult::Invalid, Err(_)) => {}
            }
        }
    }
    assert!(refused_low_order > 0);
}

#[test]
fn wycheproof_chacha20_poly1305_ring() {
    use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, UnboundKey};
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::ChaCha20Poly1305).unwrap();
    for group in &set.test_groups {
        for t in &group.tests {
            let ok = (|| {
                let key = LessSafeKey::new(UnboundKey::new(&CHACHA20_POLY1305, &t.key).ok()?);
                let nonce = Nonce::try_assume_unique_for_key(&t.nonce).ok()?;
                if t.tag.len() != 16 {
                    return None;
                }
                let mut buf = [t.ct.as_ref(), t.tag.as_ref()].concat();
                let pt = key
                    .open_in_place(nonce, Aad::from(t.aad.as_ref()), &mut buf)
                    .ok()?;
                Some(pt.to_vec())
            })();
            match t.result {
                TestResult::Valid => {
                    assert_eq!(ok.as_deref(), Some(t.pt.as_ref()), "tc {}", t.tc_id)
                }
                TestResult::Invalid => assert!(ok.is_none(), "tc {} {}", t.tc_id, t.comment),
                TestResult::Acceptable => {}
            }
        }
    }
}

#[test]
fn wycheproof_xchacha20_poly1305_key_file_cipher() {
    use chacha20poly1305::aead::{Aead, KeyInit, Payload};
    use chacha20poly1305::{XChaCha20Poly1305, XNonce};
    use wycheproof::aead::{TestName, TestSet};
    let set = TestSet::load(TestName::XChaCha20Poly1305).unwrap();
    for group in &set.test_groups {
        for t in &group.tests {
            let ok = (|| {
                let cipher = XChaCha20Poly1305::new_from_slice(&t.key).ok()?;
                let nonce: [u8; 24] = t.nonce.as_ref().try_into().ok()?;
                if t.tag.len() != 16 {
                    return None;
                }
                let ct = [t.ct.as_ref(), t.tag.as_ref()].concat();
                cipher
                    .decrypt(
                        &XNonce::from(nonce),
                        Payload {
                            msg: &ct,
                            aad: &t.aad,
                        },
                    )
                    .ok()
            })();
            match t.result {
                TestResult::Valid => {
                    assert_eq!(ok.as_deref(), Some(t.pt.as_ref()), "tc {}", t.tc_id)
                }
                TestResult::Invalid => assert!(ok.is_none(), "tc {} {}", t.tc_id, t.comment),
                TestResult::Acceptable => {}
            }
        }
    }
}
