//! Sealing organization secrets at rest under a keyring of master keys.
//!
//! A secret value is encrypted with XChaCha20-Poly1305 (the extended-nonce ChaCha20-Poly1305
//! AEAD of draft-irtf-cfrg-xchacha, built on ChaCha20-Poly1305 of RFC 8439) under a 256-bit
//! master key that lives outside the database (the operator passes it in the environment
//! variable `ARCHES_SECRETS__KEYS`). Each seal draws a fresh random 24-byte nonce from the
//! operating system, which is safe for random nonces without a counter; the caller binds the
//! ciphertext to its place by passing associated data such as `org_id/name`, so a sealed value
//! copied to another organization or name does not open.
//!
//! A master key is written `id:base64`, for example `k2:3q2+7w…=`; the id is stored next to
//! each sealed value so the keyring knows which key opens it. Rotation: put the new key first
//! in the list (it seals from then on), re-seal the stored values, then drop the old key.
//!
//! **Invariant:** no error message, `Debug` output or log line of this module contains key
//! material or a secret value.

use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{Key, KeyInit, XChaCha20Poly1305, XNonce};
use rand::rngs::OsRng;
use rand::TryRngCore;
use zeroize::Zeroizing;

/// The length of a master key in bytes: 32 (256 bits).
pub const KEY_BYTES: usize = 32;

/// The length of the nonce of a sealed value in bytes: 24 (192 bits, XChaCha20).
pub const NONCE_BYTES: usize = 24;

/// The length of the Poly1305 authentication tag at the end of every ciphertext: 16 bytes.
pub const TAG_BYTES: usize = 16;

/// The most characters in a master key id: 32 (of `[A-Za-z0-9_-]`).
pub const KEY_ID_MAX_CHARS: usize = 32;

/// The largest secret value that may be sealed, in bytes: 64 KiB (65,536).
pub const SECRET_VALUE_MAX_BYTES: usize = 65_536;

/// The error of parsing master keys and of sealing and opening secrets.
///
/// Messages are lowercase and never contain key material or a secret value.
#[derive(Debug, thiserror::Error)]
pub enum SealingError {
    /// A master key is not `id:base64` with a valid id and exactly [`KEY_BYTES`] bytes.
    #[error("master key {position} is malformed: {reason}")]
    MalformedKey {
        /// The 1-based position of the key in the list (1 for a single key).
        position: usize,
        /// What is wrong, without echoing the key.
        reason: &'static str,
    },
    /// Two master keys of a keyring have the same id. Holds the id.
    #[error("master key id \"{0}\" is configured more than once")]
    DuplicateKeyId(String),
    /// A keyring was given no master key.
    #[error("no master key is configured")]
    NoKeys,
    /// A value was sealed with a master key the keyring does not hold. Holds its id.
    #[error("the secret was sealed with master key \"{0}\", which is not configured")]
    UnknownKey(String),
    /// A stored nonce is not [`NONCE_BYTES`] bytes long.
    #[error("the secret's nonce is {len} bytes, expected 24")]
    BadNonce {
        /// The length of the nonce given, in bytes.
        len: usize,
    },
    /// Authentication failed: the key is wrong, or the ciphertext, nonce or associated data
    /// (the organization or name) was changed.
    #[error("the secret does not open: wrong key, or its ciphertext, org or name was changed")]
    Tampered,
    /// A secret value is larger than [`SECRET_VALUE_MAX_BYTES`].
    #[error("the secret value is {len} bytes, more than the limit of {max} bytes")]
    TooLarge {
        /// The length of the value, in bytes.
        len: usize,
        /// The limit, in bytes.
        max: usize,
    },
    /// The operating system's random source failed. Holds its reason.
    #[error("the operating system's random source failed: {0}")]
    Random(String),
}

/// One master key: an id and a 256-bit XChaCha20-Poly1305 key.
///
/// The key bytes are wiped from memory when the value is dropped, and `Debug` prints only the
/// id: `MasterKey { id: "k1", .. }`.
#[derive(Clone)]
pub struct MasterKey {
    id: String,
    /// Holds the key; it zeroizes the key on drop.
    cipher: XChaCha20Poly1305,
}

impl MasterKey {
    /// Parses `id:base64`: an id of 1 to [`KEY_ID_MAX_CHARS`] characters of `[A-Za-z0-9_-]`,
    /// a colon, and the standard base64 (RFC 4648 section 4, with padding) of exactly
    /// [`KEY_BYTES`] bytes. Surrounding whitespace is ignored.
    ///
    /// # Errors
    ///
    /// [`SealingError::MalformedKey`] with position 1 when the text has no colon, the id is
    /// invalid, the base64 does not decode, or the key is not 32 bytes long.
    pub fn parse(text: &str) -> Result<MasterKey, SealingError> {
        parse_at(text, 1)
    }

    /// The id of the key, as stored next to every value it seals.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// A new random key from the operating system's random source with this id, and its
    /// `id:base64` text (the form [`MasterKey::parse`] and [`Keyring::parse_list`] read), for
    /// key-generation helpers such as `arches secrets keygen`.
    ///
    /// The returned text is the secret itself: show it to the operator once, never log it.
    ///
    /// # Errors
    ///
    /// [`SealingError::MalformedKey`] (position 1) if `id` is not 1 to 32 characters of
    /// `[A-Za-z0-9_-]`; [`SealingError::Random`] if the operating system has no random source.
    pub fn generate(id: &str) -> Result<(MasterKey, String), SealingError> {
        check_id(id, 1)?;
        let mut bytes = Zeroizing::new([0_u8; KEY_BYTES]);
        OsRng
            .try_fill_bytes(bytes.as_mut())
            .map_err(|e| SealingError::Random(e.to_string()))?;
        let text = format!("{id}:{}", STANDARD.encode(bytes.as_ref()));
        let key = MasterKey {
            id: id.to_owned(),
            cipher: XChaCha20Poly1305::new(Key::from_slice(bytes.as_ref())),
        };
        Ok((key, text))
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// Parses one `id:base64` key; `position` is 1-based and only used in errors.
fn parse_at(text: &str, position: usize) -> Result<MasterKey, SealingError> {
    let malformed = |reason| SealingError::MalformedKey { position, reason };
    let (id, encoded) = text
        .trim()
        .split_once(':')
        .ok_or(malformed("expected `id:base64`"))?;
    check_id(id, position)?;
    // The decoder's own error names the offending byte, which is key material: not shown.
    let bytes = Zeroizing::new(
        STANDARD
            .decode(encoded)
            .map_err(|_| malformed("the key is not standard base64"))?,
    );
    if bytes.len() != KEY_BYTES {
        return Err(malformed("the key is not 32 bytes"));
    }
    Ok(MasterKey {
        id: id.to_owned(),
        cipher: XChaCha20Poly1305::new(Key::from_slice(&bytes)),
    })
}

/// Checks that `id` is 1 to [`KEY_ID_MAX_CHARS`] characters of `[A-Za-z0-9_-]`.
fn check_id(id: &str, position: usize) -> Result<(), SealingError> {
    let valid = !id.is_empty()
        && id.len() <= KEY_ID_MAX_CHARS
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if valid {
        Ok(())
    } else {
        Err(SealingError::MalformedKey {
            position,
            reason: "the id must be 1 to 32 characters of A-Z, a-z, 0-9, _ and -",
        })
    }
}

/// A value sealed by [`Keyring::seal`]: store all three fields next to the secret's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sealed {
    /// The id of the master key that sealed the value.
    pub key_id: String,
    /// The random nonce, [`NONCE_BYTES`] (24) bytes.
    pub nonce: Vec<u8>,
    /// The ciphertext followed by the 16-byte Poly1305 tag: the plaintext's length plus
    /// [`TAG_BYTES`].
    pub ciphertext: Vec<u8>,
}

/// The master keys of a server: the first (active) key seals, every key opens.
#[derive(Debug, Clone)]
pub struct Keyring {
    /// The index of the key that seals; always 0, the first key given.
    active: usize,
    keys: Vec<MasterKey>,
}

impl Keyring {
    /// A keyring of `keys`: the first key seals new values, every key opens values it sealed.
    ///
    /// Rotation: put the new key first, re-seal the stored values, then drop the old key.
    ///
    /// # Errors
    ///
    /// [`SealingError::NoKeys`] if `keys` is empty; [`SealingError::DuplicateKeyId`] if two
    /// keys share an id.
    pub fn new(keys: Vec<MasterKey>) -> Result<Keyring, SealingError> {
        if keys.is_empty() {
            return Err(SealingError::NoKeys);
        }
        for (i, key) in keys.iter().enumerate() {
            if keys[..i].iter().any(|k| k.id == key.id) {
                return Err(SealingError::DuplicateKeyId(key.id.clone()));
            }
        }
        Ok(Keyring { active: 0, keys })
    }

    /// Parses a comma- or whitespace-separated list of `id:base64` keys (the form of the
    /// environment variable `ARCHES_SECRETS__KEYS`), the active key first.
    ///
    /// # Errors
    ///
    /// [`SealingError::MalformedKey`] naming the 1-based position of the first bad key;
    /// [`SealingError::NoKeys`] if the list is empty or blank; [`SealingError::DuplicateKeyId`].
    pub fn parse_list(text: &str) -> Result<Keyring, SealingError> {
        let keys = text
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|part| !part.is_empty())
            .enumerate()
            .map(|(i, part)| parse_at(part, i + 1))
            .collect::<Result<Vec<_>, _>>()?;
        Keyring::new(keys)
    }

    /// The id of the key that seals.
    pub fn active_key_id(&self) -> &str {
        &self.keys[self.active].id
    }

    /// The ids of all keys, the active key first.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.iter().map(|k| k.id.as_str())
    }

    /// Seals `plaintext` under the active key with XChaCha20-Poly1305 and a fresh random
    /// 24-byte nonce. `aad` is authenticated but not encrypted: pass what the value belongs
    /// to (for example `org_id/name`), and pass the same bytes to [`Keyring::open`].
    ///
    /// # Errors
    ///
    /// [`SealingError::TooLarge`] if `plaintext` is longer than [`SECRET_VALUE_MAX_BYTES`];
    /// [`SealingError::Random`] if the operating system has no random source.
    pub fn seal(&self, plaintext: &[u8], aad: &[u8]) -> Result<Sealed, SealingError> {
        if plaintext.len() > SECRET_VALUE_MAX_BYTES {
            return Err(SealingError::TooLarge {
                len: plaintext.len(),
                max: SECRET_VALUE_MAX_BYTES,
            });
        }
        let key = &self.keys[self.active];
        let mut nonce = [0_u8; NONCE_BYTES];
        OsRng
            .try_fill_bytes(&mut nonce)
            .map_err(|e| SealingError::Random(e.to_string()))?;
        let ciphertext = key
            .cipher
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad,
                },
            )
            // Encryption fails only for inputs near 256 GiB, far above the bound checked above.
            .map_err(|_| SealingError::TooLarge {
                len: plaintext.len(),
                max: SECRET_VALUE_MAX_BYTES,
            })?;
        Ok(Sealed {
            key_id: key.id.clone(),
            nonce: nonce.to_vec(),
            ciphertext,
        })
    }

    /// Opens a value sealed by [`Keyring::seal`] with the key named `key_id`, checking the
    /// Poly1305 tag over `ciphertext` and `aad`. The plaintext is wiped from memory when the
    /// returned buffer is dropped.
    ///
    /// # Errors
    ///
    /// [`SealingError::UnknownKey`] if no key is named `key_id`; [`SealingError::BadNonce`] if
    /// `nonce` is not 24 bytes; [`SealingError::TooLarge`] if the ciphertext holds more than
    /// [`SECRET_VALUE_MAX_BYTES`]; [`SealingError::Tampered`] if authentication fails (wrong
    /// key, or the ciphertext, nonce or `aad` was changed).
    pub fn open(
        &self,
        key_id: &str,
        nonce: &[u8],
        ciphertext: &[u8],
        aad: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, SealingError> {
        let key = self
            .keys
            .iter()
            .find(|k| k.id == key_id)
            .ok_or_else(|| SealingError::UnknownKey(key_id.to_owned()))?;
        if nonce.len() != NONCE_BYTES {
            return Err(SealingError::BadNonce { len: nonce.len() });
        }
        let len = ciphertext.len().saturating_sub(TAG_BYTES);
        if len > SECRET_VALUE_MAX_BYTES {
            return Err(SealingError::TooLarge {
                len,
                max: SECRET_VALUE_MAX_BYTES,
            });
        }
        key.cipher
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: ciphertext,
                    aad,
                },
            )
            .map(Zeroizing::new)
            .map_err(|_| SealingError::Tampered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AAD: &[u8] = b"0190a1b2-org/DATABASE_URL";

    fn key(id: &str) -> MasterKey {
        MasterKey::generate(id).unwrap().0
    }

    fn text_of(id: &str, bytes: &[u8]) -> String {
        format!("{id}:{}", STANDARD.encode(bytes))
    }

    fn malformed(result: Result<impl fmt::Debug, SealingError>) -> (usize, &'static str) {
        match result.unwrap_err() {
            SealingError::MalformedKey { position, reason } => (position, reason),
            other => panic!("expected MalformedKey, got {other:?}"),
        }
    }

    #[test]
    fn seal_then_open_gives_the_plaintext_back() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        let sealed = ring.seal(b"postgres://u:p@db/x", AAD).unwrap();
        assert_eq!(sealed.key_id, "k1");
        assert_eq!(sealed.nonce.len(), NONCE_BYTES);
        assert_eq!(
            sealed.ciphertext.len(),
            b"postgres://u:p@db/x".len() + TAG_BYTES
        );
        let opened = ring
            .open(&sealed.key_id, &sealed.nonce, &sealed.ciphertext, AAD)
            .unwrap();
        assert_eq!(opened.as_slice(), b"postgres://u:p@db/x");

        let empty = ring.seal(b"", AAD).unwrap();
        let opened = ring
            .open(&empty.key_id, &empty.nonce, &empty.ciphertext, AAD)
            .unwrap();
        assert!(opened.is_empty());
    }

    #[test]
    fn two_seals_of_one_value_differ() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        let a = ring.seal(b"same value", AAD).unwrap();
        let b = ring.seal(b"same value", AAD).unwrap();
        assert_ne!(a.nonce, b.nonce);
        assert_ne!(a.ciphertext, b.ciphertext);
    }

    #[test]
    fn a_parsed_key_opens_what_its_generated_twin_sealed() {
        let (generated, text) = MasterKey::generate("k-1_a").unwrap();
        let sealer = Keyring::new(vec![generated]).unwrap();
        let opener = Keyring::parse_list(&text).unwrap();
        let sealed = sealer.seal(b"v", AAD).unwrap();
        let opened = opener
            .open("k-1_a", &sealed.nonce, &sealed.ciphertext, AAD)
            .unwrap();
        assert_eq!(opened.as_slice(), b"v");
    }

    #[test]
    fn a_wrong_aad_is_refused() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        let sealed = ring.seal(b"value", AAD).unwrap();
        let err = ring
            .open(
                "k1",
                &sealed.nonce,
                &sealed.ciphertext,
                b"0190a1b2-org/OTHER",
            )
            .unwrap_err();
        assert!(matches!(err, SealingError::Tampered), "{err:?}");
        assert_eq!(
            err.to_string(),
            "the secret does not open: wrong key, or its ciphertext, org or name was changed"
        );
    }

    #[test]
    fn a_flipped_bit_is_refused() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        let sealed = ring.seal(b"value", AAD).unwrap();
        for i in [0, sealed.ciphertext.len() - 1] {
            let mut changed = sealed.ciphertext.clone();
            changed[i] ^= 0x01;
            let err = ring.open("k1", &sealed.nonce, &changed, AAD).unwrap_err();
            assert!(matches!(err, SealingError::Tampered), "{err:?}");
        }
        let mut nonce = sealed.nonce.clone();
        nonce[0] ^= 0x80;
        let err = ring
            .open("k1", &nonce, &sealed.ciphertext, AAD)
            .unwrap_err();
        assert!(matches!(err, SealingError::Tampered), "{err:?}");
        let err = ring
            .open(
                "k1",
                &sealed.nonce,
                &sealed.ciphertext[..TAG_BYTES - 1],
                AAD,
            )
            .unwrap_err();
        assert!(matches!(err, SealingError::Tampered), "{err:?}");
    }

    #[test]
    fn a_key_under_another_id_does_not_open() {
        let sealer = Keyring::new(vec![key("k1")]).unwrap();
        let other = Keyring::new(vec![key("k1")]).unwrap();
        let sealed = sealer.seal(b"value", AAD).unwrap();
        let err = other
            .open("k1", &sealed.nonce, &sealed.ciphertext, AAD)
            .unwrap_err();
        assert!(matches!(err, SealingError::Tampered), "{err:?}");
    }

    #[test]
    fn rotation_opens_old_values_and_seals_with_the_new_key() {
        let (k1, k1_text) = MasterKey::generate("k1").unwrap();
        let (k2, k2_text) = MasterKey::generate("k2").unwrap();
        let old = Keyring::new(vec![k1]).unwrap();
        let sealed_by_k1 = old.seal(b"value", AAD).unwrap();

        let rotating = Keyring::parse_list(&format!("{k2_text}, {k1_text}")).unwrap();
        assert_eq!(rotating.active_key_id(), "k2");
        assert_eq!(rotating.key_ids().collect::<Vec<_>>(), ["k2", "k1"]);
        let opened = rotating
            .open("k1", &sealed_by_k1.nonce, &sealed_by_k1.ciphertext, AAD)
            .unwrap();
        assert_eq!(opened.as_slice(), b"value");
        let resealed = rotating.seal(&opened, AAD).unwrap();
        assert_eq!(resealed.key_id, "k2");

        let rotated = Keyring::new(vec![k2]).unwrap();
        let opened = rotated
            .open("k2", &resealed.nonce, &resealed.ciphertext, AAD)
            .unwrap();
        assert_eq!(opened.as_slice(), b"value");
        let err = rotated
            .open("k1", &sealed_by_k1.nonce, &sealed_by_k1.ciphertext, AAD)
            .unwrap_err();
        assert!(
            matches!(&err, SealingError::UnknownKey(id) if id == "k1"),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            "the secret was sealed with master key \"k1\", which is not configured"
        );
    }

    #[test]
    fn malformed_keys_are_refused_without_echoing_them() {
        let good = STANDARD.encode([7_u8; KEY_BYTES]);
        assert!(MasterKey::parse(&format!("k1:{good}")).is_ok());
        assert!(MasterKey::parse(&format!("  k1:{good}\n")).is_ok());

        let (position, reason) = malformed(MasterKey::parse(&good));
        assert_eq!((position, reason), (1, "expected `id:base64`"));

        let (_, reason) = malformed(MasterKey::parse("k1:not*base64!"));
        assert_eq!(reason, "the key is not standard base64");
        // URL-safe alphabet and missing padding are not standard base64.
        let url_safe = text_of("k1", &[0xfb_u8; KEY_BYTES]).replace('+', "-");
        assert_eq!(
            malformed(MasterKey::parse(&url_safe)).1,
            "the key is not standard base64"
        );
        let unpadded = format!("k1:{}", good.trim_end_matches('='));
        assert_eq!(
            malformed(MasterKey::parse(&unpadded)).1,
            "the key is not standard base64"
        );

        let short = text_of("k1", &[7_u8; 31]);
        assert_eq!(
            malformed(MasterKey::parse(&short)).1,
            "the key is not 32 bytes"
        );
        let long = text_of("k1", &[7_u8; 33]);
        assert_eq!(
            malformed(MasterKey::parse(&long)).1,
            "the key is not 32 bytes"
        );

        for id in ["", "k 1", "k.1", "ключ", &"k".repeat(33)] {
            let (_, reason) = malformed(MasterKey::parse(&format!("{id}:{good}")));
            assert!(reason.starts_with("the id must be"), "{id:?}: {reason}");
        }
        assert!(MasterKey::parse(&format!("{}:{good}", "k".repeat(32))).is_ok());
        assert_eq!(
            malformed(MasterKey::generate("bad id")).1,
            "the id must be 1 to 32 characters of A-Z, a-z, 0-9, _ and -"
        );

        let err = MasterKey::parse(&short).unwrap_err().to_string();
        assert_eq!(err, "master key 1 is malformed: the key is not 32 bytes");
        assert!(!err.contains(&STANDARD.encode([7_u8; 31])));
    }

    #[test]
    fn a_list_names_the_position_of_its_bad_key() {
        let k1 = text_of("k1", &[1_u8; KEY_BYTES]);
        let k3 = text_of("k3", &[3_u8; KEY_BYTES]);
        let list = format!("{k1},\n  k2:AAAA , {k3}");
        let err = Keyring::parse_list(&list).unwrap_err();
        assert!(
            matches!(err, SealingError::MalformedKey { position: 2, .. }),
            "{err:?}"
        );
        assert!(err.to_string().starts_with("master key 2 is malformed: "));

        let ring = Keyring::parse_list(&format!(" {k1} ,, {k3}\t")).unwrap();
        assert_eq!(ring.key_ids().collect::<Vec<_>>(), ["k1", "k3"]);
    }

    #[test]
    fn duplicate_ids_and_empty_lists_are_refused() {
        let err = Keyring::new(vec![key("k1"), key("k2"), key("k1")]).unwrap_err();
        assert!(
            matches!(&err, SealingError::DuplicateKeyId(id) if id == "k1"),
            "{err:?}"
        );
        let k1 = text_of("k1", &[1_u8; KEY_BYTES]);
        let err = Keyring::parse_list(&format!("{k1} {k1}")).unwrap_err();
        assert!(matches!(err, SealingError::DuplicateKeyId(_)), "{err:?}");

        assert!(matches!(Keyring::new(vec![]), Err(SealingError::NoKeys)));
        assert!(matches!(Keyring::parse_list(""), Err(SealingError::NoKeys)));
        assert!(matches!(
            Keyring::parse_list(" ,\n, "),
            Err(SealingError::NoKeys)
        ));
    }

    #[test]
    fn debug_shows_ids_but_never_key_material() {
        let (key, text) = MasterKey::generate("k1").unwrap();
        let encoded = text.split_once(':').unwrap().1;
        let shown = format!("{key:?}");
        assert_eq!(shown, "MasterKey { id: \"k1\", .. }");
        let ring = Keyring::new(vec![key]).unwrap();
        let shown = format!("{ring:?} {ring:#?}");
        assert!(shown.contains("k1"));
        assert!(!shown.contains(encoded), "{shown}");
        assert!(!shown.contains(&encoded[..8]), "{shown}");
    }

    #[test]
    fn an_oversize_value_is_refused() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        assert!(ring.seal(&vec![0_u8; SECRET_VALUE_MAX_BYTES], AAD).is_ok());
        let err = ring
            .seal(&vec![0_u8; SECRET_VALUE_MAX_BYTES + 1], AAD)
            .unwrap_err();
        assert!(
            matches!(
                err,
                SealingError::TooLarge {
                    len: 65_537,
                    max: 65_536
                }
            ),
            "{err:?}"
        );
        let err = ring
            .open(
                "k1",
                &[0_u8; NONCE_BYTES],
                &vec![0_u8; SECRET_VALUE_MAX_BYTES + TAG_BYTES + 1],
                AAD,
            )
            .unwrap_err();
        assert!(matches!(err, SealingError::TooLarge { .. }), "{err:?}");
    }

    #[test]
    fn a_nonce_of_the_wrong_length_is_refused() {
        let ring = Keyring::new(vec![key("k1")]).unwrap();
        let sealed = ring.seal(b"value", AAD).unwrap();
        for len in [0, 12, 23, 25] {
            let nonce = vec![0_u8; len];
            let err = ring
                .open("k1", &nonce, &sealed.ciphertext, AAD)
                .unwrap_err();
            assert!(
                matches!(err, SealingError::BadNonce { len: l } if l == len),
                "{err:?}"
            );
        }
    }
}
