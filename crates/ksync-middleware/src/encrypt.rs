//! Authenticated encryption of an event's `data` with ChaCha20-Poly1305.
//!
//! The encrypted form replaces `data` with
//! `{"enc":"chacha20poly1305","nonce":"<base64, 12 bytes>","ct":"<base64 ciphertext + tag>"}`.
//! The plaintext is the JSON text of the original `data`. The event's `id`, `version` and `type`
//! are authenticated too (associated data), so an envelope moved to another event, or an event
//! whose type was changed, fails to decrypt instead of yielding someone else's data.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use blake2::Blake2bMac;
use blake2::digest::Mac as _;
use blake2::digest::consts::U32;
use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use ksync_core::{Event, Middleware, MiddlewareError};
use serde_json::{Map, Value};

use crate::error::Error;
use crate::types::TypeSet;

/// The `enc` value of the encrypted form.
pub const CIPHER_NAME: &str = "chacha20poly1305";

const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Domain separation for the associated data; bump it if the layout ever changes.
const AAD_DOMAIN: &[u8] = b"ksync-field-enc-v1";

/// How nonces are chosen. Both give a fresh nonce for every distinct plaintext.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum NonceMode {
    /// The nonce is a keyed BLAKE2b hash of the event's `id`, `version`, `type` and plaintext
    /// (a synthetic IV). The same revision always encrypts to the same bytes, so a revision that
    /// is resent (transports deliver at least once) deduplicates at the server and at peers
    /// instead of looking like a second, conflicting content for the same `(id, version)`.
    /// It reveals only that two envelopes hold the same revision, which `(id, version)` says anyway.
    #[default]
    Synthetic,
    /// A random nonce from the operating system for every encryption. Every send of the same
    /// revision differs, so a resend after a lost acknowledgement reaches the server as a
    /// conflicting revision; use only where each revision is sent exactly once.
    Random,
}

/// The most memory [`KdfParams::memory_kib`] may ask for: 4 GiB (Argon2 allocates it in one
/// piece; far more than any recommended cost, and a larger ask fails to allocate, which
/// aborts the process instead of returning an error).
pub const MAX_KDF_MEMORY_KIB: u32 = 4 * 1024 * 1024;

/// Cost of turning a passphrase into a key with Argon2id ([`FieldCipher::from_passphrase_with`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfParams {
    /// Memory in KiB. Default 19 456 (19 MiB), the OWASP recommendation for Argon2id; at most
    /// [`MAX_KDF_MEMORY_KIB`].
    pub memory_kib: u32,
    /// Passes over the memory. Default 2.
    pub iterations: u32,
}

impl Default for KdfParams {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
        }
    }
}

/// The key material for [`Encrypt`] and [`Decrypt`]: one 32-byte key, from which a cipher key
/// and a nonce key are derived (keyed BLAKE2b with distinct personalisations).
///
/// `Debug` never prints key material. Every replica that must read the data needs the same key
/// (or the same passphrase and salt).
///
/// ```
/// use ksync_core::Event;
/// use ksync_middleware::{Error, FieldCipher};
/// use serde_json::json;
///
/// let cipher = FieldCipher::from_key([1; 32]);
/// let event = Event::new("42", "user_data", json!({"ssn": "123-45-6789"}), 1);
/// let sealed = cipher.encrypt_event(event.clone())?;
/// assert_eq!(cipher.decrypt_event(sealed.clone())?, event);
/// // Another key is a typed error, never garbage.
/// let wrong = FieldCipher::from_key([2; 32]);
/// assert!(matches!(wrong.decrypt_event(sealed), Err(Error::Decrypt)));
/// # Ok::<(), Error>(())
/// ```
#[derive(Clone)]
pub struct FieldCipher {
    aead: ChaCha20Poly1305,
    nonce_key: [u8; 32],
    nonces: NonceMode,
}

impl fmt::Debug for FieldCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FieldCipher")
            .field("key", &"<redacted>")
            .field("nonces", &self.nonces)
            .finish()
    }
}

impl FieldCipher {
    /// A cipher from a 32-byte key (e.g. from a key-management system or `openssl rand 32`).
    pub fn from_key(key: [u8; 32]) -> Self {
        let cipher_key = subkey(&key, b"ksync.enc.key.v1");
        let nonce_key = subkey(&key, b"ksync.nonce.v1");
        Self {
            aead: ChaCha20Poly1305::new(Key::from_slice(&cipher_key)),
            nonce_key,
            nonces: NonceMode::Synthetic,
        }
    }

    /// A cipher from a key given as a byte slice; anything but 32 bytes is [`Error::KeyLength`].
    pub fn from_key_slice(key: &[u8]) -> Result<Self, Error> {
        let key: [u8; 32] = key.try_into().map_err(|_| Error::KeyLength(key.len()))?;
        Ok(Self::from_key(key))
    }

    /// A cipher from a passphrase with Argon2id at [`KdfParams::default`] cost (about 19 MiB
    /// and a fraction of a second in a release build).
    ///
    /// `salt` (at least 8 bytes) must be the same on every replica that shares the data; an
    /// application-specific constant such as `b"my-app/user_data"` is fine, since the point is
    /// to make guessing passphrases expensive, not to hide which application this is.
    pub fn from_passphrase(passphrase: &str, salt: &[u8]) -> Result<Self, Error> {
        Self::from_passphrase_with(passphrase, salt, KdfParams::default())
    }

    /// Like [`FieldCipher::from_passphrase`] with an explicit Argon2id cost. An empty
    /// passphrase, or memory above [`MAX_KDF_MEMORY_KIB`], is [`Error::Kdf`].
    pub fn from_passphrase_with(
        passphrase: &str,
        salt: &[u8],
        params: KdfParams,
    ) -> Result<Self, Error> {
        if passphrase.is_empty() {
            return Err(Error::Kdf(
                "the passphrase is empty (anyone could derive the key)".into(),
            ));
        }
        if params.memory_kib > MAX_KDF_MEMORY_KIB {
            return Err(Error::Kdf(format!(
                "memory cost {} KiB is above the limit of {MAX_KDF_MEMORY_KIB} KiB",
                params.memory_kib
            )));
        }
        let argon_params = argon2::Params::new(params.memory_kib, params.iterations, 1, Some(32))
            .map_err(|e| Error::Kdf(e.to_string()))?;
        let argon = argon2::Argon2::new(
            argon2::Algorithm::Argon2id,
            argon2::Version::V0x13,
            argon_params,
        );
        let mut key = [0u8; 32];
        argon
            .hash_password_into(passphrase.as_bytes(), salt, &mut key)
            .map_err(|e| Error::Kdf(e.to_string()))?;
        Ok(Self::from_key(key))
    }

    /// Chooses how nonces are made (default [`NonceMode::Synthetic`]).
    #[must_use]
    pub fn with_nonce_mode(mut self, nonces: NonceMode) -> Self {
        self.nonces = nonces;
        self
    }

    /// The event with its `data` replaced by the encrypted form.
    pub fn encrypt_event(&self, mut event: Event) -> Result<Event, Error> {
        event.data = self.encrypt_data(&event)?;
        Ok(event)
    }

    /// The event with its encrypted `data` replaced by the plaintext. Plain `data` is
    /// [`Error::NotEncrypted`]; a wrong key or any change to the envelope or to the event's
    /// `id`, `version` or `type` is [`Error::Decrypt`].
    pub fn decrypt_event(&self, mut event: Event) -> Result<Event, Error> {
        event.data = self.decrypt_data(&event)?;
        Ok(event)
    }

    /// The encrypted form of `event.data`, bound to the event's `id`, `version` and `type`.
    pub fn encrypt_data(&self, event: &Event) -> Result<Value, Error> {
        let plaintext = serde_json::to_vec(&event.data).map_err(Error::Json)?;
        let aad = associated_data(event);
        let nonce = match self.nonces {
            NonceMode::Synthetic => self.synthetic_nonce(&aad, &plaintext),
            NonceMode::Random => ChaCha20Poly1305::generate_nonce(&mut OsRng),
        };
        let ct = self
            .aead
            .encrypt(
                &nonce,
                Payload {
                    msg: &plaintext,
                    aad: &aad,
                },
            )
            .map_err(|_| Error::Encrypt)?;
        let mut envelope = Map::new();
        envelope.insert("enc".into(), Value::String(CIPHER_NAME.into()));
        envelope.insert("nonce".into(), Value::String(B64.encode(nonce)));
        envelope.insert("ct".into(), Value::String(B64.encode(ct)));
        Ok(Value::Object(envelope))
    }

    /// The plaintext `data` of an event whose `data` is the encrypted form.
    pub fn decrypt_data(&self, event: &Event) -> Result<Value, Error> {
        let Some(envelope) = Envelope::parse(&event.data)? else {
            return Err(Error::NotEncrypted {
                id: event.id.clone(),
                event_type: event.event_type.clone(),
            });
        };
        let plaintext = self
            .aead
            .decrypt(
                Nonce::from_slice(&envelope.nonce),
                Payload {
                    msg: &envelope.ct,
                    aad: &associated_data(event),
                },
            )
            .map_err(|_| Error::Decrypt)?;
        // Data older builds encrypted may nest 128 levels, past what serde_json reads; the
        // transport's receive check bounds it once decrypted.
        ksync_core::received_json::from_slice(&plaintext).map_err(Error::Json)
    }

    /// Whether `data` has the shape of the encrypted form (without checking it decrypts).
    pub fn is_encrypted(data: &Value) -> bool {
        data.as_object().is_some_and(|o| o.contains_key("enc"))
    }

    fn synthetic_nonce(&self, aad: &[u8], plaintext: &[u8]) -> Nonce {
        let mut mac = mac(&self.nonce_key, b"ksync.siv.v1");
        mac.update(&(aad.len() as u64).to_be_bytes());
        mac.update(aad);
        mac.update(plaintext);
        let digest = mac.finalize().into_bytes();
        *Nonce::from_slice(&digest[..NONCE_LEN])
    }
}

/// Keyed BLAKE2b-256 with a personalisation string (at most 16 bytes).
fn mac(key: &[u8; 32], persona: &[u8]) -> Blake2bMac<U32> {
    // A 32-byte key, no salt and a persona under 16 bytes are always accepted.
    Blake2bMac::<U32>::new_with_salt_and_personal(key, &[], persona)
        .unwrap_or_else(|_| unreachable!("32-byte key and short persona are valid for BLAKE2b"))
}

fn subkey(master: &[u8; 32], persona: &[u8]) -> [u8; 32] {
    mac(master, persona).finalize().into_bytes().into()
}

/// `domain | len(id) | id | version | len(type) | type`: unambiguous, so no two events share it.
fn associated_data(event: &Event) -> Vec<u8> {
    let mut aad =
        Vec::with_capacity(AAD_DOMAIN.len() + 24 + event.id.len() + event.event_type.len());
    aad.extend_from_slice(AAD_DOMAIN);
    aad.extend_from_slice(&(event.id.len() as u64).to_be_bytes());
    aad.extend_from_slice(event.id.as_bytes());
    aad.extend_from_slice(&event.version.to_be_bytes());
    aad.extend_from_slice(&(event.event_type.len() as u64).to_be_bytes());
    aad.extend_from_slice(event.event_type.as_bytes());
    aad
}

struct Envelope {
    nonce: Vec<u8>,
    ct: Vec<u8>,
}

impl Envelope {
    /// `Ok(None)`: not an envelope at all (no `enc` key).
    fn parse(data: &Value) -> Result<Option<Self>, Error> {
        let Some(obj) = data.as_object() else {
            return Ok(None);
        };
        let Some(enc) = obj.get("enc") else {
            return Ok(None);
        };
        let enc = enc
            .as_str()
            .ok_or_else(|| Error::Malformed("\"enc\" is not a string".into()))?;
        if enc != CIPHER_NAME {
            return Err(Error::UnsupportedCipher(enc.to_owned()));
        }
        if obj.len() != 3 {
            return Err(Error::Malformed(
                "expected exactly the keys \"enc\", \"nonce\" and \"ct\"".into(),
            ));
        }
        let field = |name: &str| -> Result<Vec<u8>, Error> {
            let text = obj.get(name).and_then(Value::as_str).ok_or_else(|| {
                Error::Malformed(format!("\"{name}\" is missing or not a string"))
            })?;
            B64.decode(text)
                .map_err(|e| Error::Malformed(format!("\"{name}\" is not base64: {e}")))
        };
        let nonce = field("nonce")?;
        if nonce.len() != NONCE_LEN {
            return Err(Error::Malformed(format!(
                "nonce is {} bytes, expected {NONCE_LEN}",
                nonce.len()
            )));
        }
        let ct = field("ct")?;
        if ct.len() < TAG_LEN {
            return Err(Error::Malformed(format!(
                "ciphertext is {} bytes, shorter than the {TAG_LEN}-byte tag",
                ct.len()
            )));
        }
        Ok(Some(Envelope { nonce, ct }))
    }
}

/// Outgoing middleware: encrypts `data` (of every event, or of the types given to
/// [`Encrypt::only_types`]). The spec's `if (event.type === 'user_data') event.data = encrypt(..)`.
#[derive(Debug, Clone)]
pub struct Encrypt {
    cipher: FieldCipher,
    types: TypeSet,
}

impl Encrypt {
    /// Encrypts the data of every event.
    pub fn new(cipher: FieldCipher) -> Self {
        Self {
            cipher,
            types: TypeSet::default(),
        }
    }

    /// Encrypts only events of these types; others pass unchanged.
    #[must_use]
    pub fn only_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types = TypeSet::only(types);
        self
    }
}

impl Middleware for Encrypt {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        if !self.types.contains(&event.event_type) {
            return Ok(Some(event));
        }
        self.cipher
            .encrypt_event(event)
            .map(Some)
            .map_err(|e| e.into_middleware_error(self.name()))
    }

    fn name(&self) -> &str {
        "encrypt"
    }
}

/// Incoming middleware: decrypts `data` (of every event, or of the types given to
/// [`Decrypt::only_types`]).
///
/// Events of a selected type with plain `data` fail ([`Error::NotEncrypted`]) rather than pass:
/// accepting them would let anyone who can send events bypass the encryption. Wrong keys and
/// tampering fail with [`Error::Decrypt`].
///
/// A client reports a refused event (an `error` notification), does not store it, and moves
/// past it, so one undecryptable event cannot stall the stream. A replica that ran with a
/// wrong key therefore does not read those events again once given the right one; it reads
/// the room from the start only on a fresh storage.
#[derive(Debug, Clone)]
pub struct Decrypt {
    cipher: FieldCipher,
    types: TypeSet,
}

impl Decrypt {
    /// Decrypts the data of every event.
    pub fn new(cipher: FieldCipher) -> Self {
        Self {
            cipher,
            types: TypeSet::default(),
        }
    }

    /// Decrypts only events of these types; others pass unchanged.
    #[must_use]
    pub fn only_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types = TypeSet::only(types);
        self
    }
}

impl Middleware for Decrypt {
    fn process(&self, event: Event) -> Result<Option<Event>, MiddlewareError> {
        if !self.types.contains(&event.event_type) {
            return Ok(Some(event));
        }
        self.cipher
            .decrypt_event(event)
            .map(Some)
            .map_err(|e| e.into_middleware_error(self.name()))
    }

    fn name(&self) -> &str {
        "decrypt"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ksync_core::{Direction, Pipeline};
    use serde_json::json;

    fn event() -> Event {
        Event::new(
            "u1",
            "user_data",
            json!({"email": "a@example.com", "age": 40}),
            1_700_000_000_000,
        )
        .with_origin("r1")
    }

    /// Cheap Argon2 parameters so debug-build tests stay fast.
    const CHEAP: KdfParams = KdfParams {
        memory_kib: 64,
        iterations: 1,
    };

    #[test]
    fn round_trip_and_shape() {
        let cipher = FieldCipher::from_key([9; 32]);
        let sealed = cipher.encrypt_event(event()).expect("encrypt");
        let obj = sealed.data.as_object().expect("object");
        assert_eq!(obj.len(), 3);
        assert_eq!(obj["enc"], CIPHER_NAME);
        assert_eq!(
            B64.decode(obj["nonce"].as_str().expect("s"))
                .expect("b64")
                .len(),
            12
        );
        assert!(!sealed.data.to_string().contains("example.com"));
        assert_eq!((sealed.id.as_str(), sealed.version), ("u1", 1));
        assert_eq!(cipher.decrypt_event(sealed).expect("decrypt"), event());
    }

    #[test]
    fn synthetic_nonces_are_deterministic_random_ones_are_not() {
        let cipher = FieldCipher::from_key([9; 32]);
        let a = cipher.encrypt_data(&event()).expect("a");
        assert_eq!(
            a,
            cipher.encrypt_data(&event()).expect("b"),
            "resend deduplicates"
        );
        let mut other = event();
        other.data = json!({"email": "b@example.com", "age": 40});
        assert_ne!(a["nonce"], cipher.encrypt_data(&other).expect("c")["nonce"]);

        let random = cipher.clone().with_nonce_mode(NonceMode::Random);
        let r1 = random.encrypt_data(&event()).expect("r1");
        let r2 = random.encrypt_data(&event()).expect("r2");
        assert_ne!(r1, r2);
        // Either mode decrypts with the same key.
        let mut sealed = event();
        sealed.data = r1;
        assert_eq!(cipher.decrypt_event(sealed).expect("decrypt"), event());
    }

    #[test]
    fn wrong_key_and_tampering_are_typed_errors() {
        let cipher = FieldCipher::from_key([9; 32]);
        let sealed = cipher.encrypt_event(event()).expect("encrypt");

        let wrong = FieldCipher::from_key([8; 32]);
        assert!(matches!(
            wrong.decrypt_event(sealed.clone()),
            Err(Error::Decrypt)
        ));

        // Flip one ciphertext bit.
        let mut ct = B64
            .decode(sealed.data["ct"].as_str().expect("s"))
            .expect("b64");
        ct[0] ^= 1;
        let mut flipped = sealed.clone();
        flipped.data["ct"] = json!(B64.encode(&ct));
        assert!(matches!(cipher.decrypt_event(flipped), Err(Error::Decrypt)));

        // The envelope moved to another event, or the event re-typed or re-versioned.
        let mut moved = sealed.clone();
        moved.id = "u2".into();
        assert!(matches!(cipher.decrypt_event(moved), Err(Error::Decrypt)));
        let mut retyped = sealed.clone();
        retyped.event_type = "other".into();
        assert!(matches!(cipher.decrypt_event(retyped), Err(Error::Decrypt)));
        let mut reversioned = sealed.clone();
        reversioned.version = 2;
        assert!(matches!(
            cipher.decrypt_event(reversioned),
            Err(Error::Decrypt)
        ));
    }

    #[test]
    fn malformed_envelopes_are_typed_errors() {
        let cipher = FieldCipher::from_key([9; 32]);
        let sealed = cipher.encrypt_event(event()).expect("encrypt");
        let with = |data: Value| {
            let mut e = sealed.clone();
            e.data = data;
            cipher.decrypt_event(e)
        };
        assert!(matches!(
            with(json!({"plain": true})),
            Err(Error::NotEncrypted { .. })
        ));
        assert!(matches!(
            with(json!("text")),
            Err(Error::NotEncrypted { .. })
        ));
        assert!(matches!(
            with(json!({"enc": "aes-gcm", "nonce": "", "ct": ""})),
            Err(Error::UnsupportedCipher(c)) if c == "aes-gcm"
        ));
        assert!(matches!(
            with(json!({"enc": CIPHER_NAME, "nonce": "!!", "ct": sealed.data["ct"]})),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(
                json!({"enc": CIPHER_NAME, "nonce": B64.encode([0u8; 8]), "ct": sealed.data["ct"]})
            ),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(
                json!({"enc": CIPHER_NAME, "nonce": sealed.data["nonce"], "ct": B64.encode([0u8; 4])})
            ),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(
            with(json!({"enc": CIPHER_NAME, "nonce": sealed.data["nonce"]})),
            Err(Error::Malformed(_))
        ));
        assert!(matches!(with(json!({"enc": 1})), Err(Error::Malformed(_))));
    }

    /// Data older builds encrypted as deep as they allowed (128 levels) decrypts: its JSON
    /// nests past the 127 levels serde_json reads, so the event failed to decrypt.
    #[test]
    fn data_older_builds_encrypted_128_levels_deep_decrypts() {
        let cipher = FieldCipher::from_key([7; 32]);
        let deep = Event::new(
            "deep",
            "t",
            ksync_testkit::edge_data::nested(ksync_core::MAX_RECEIVED_DATA_DEPTH),
            1,
        );
        let sealed = cipher.encrypt_event(deep.clone()).expect("enc");
        assert_eq!(cipher.decrypt_event(sealed).expect("dec"), deep);
    }

    #[test]
    fn keys_from_slices_and_passphrases() {
        assert!(matches!(
            FieldCipher::from_key_slice(&[0; 31]),
            Err(Error::KeyLength(31))
        ));
        let from_slice = FieldCipher::from_key_slice(&[9; 32]).expect("32 bytes");
        let sealed = FieldCipher::from_key([9; 32])
            .encrypt_event(event())
            .expect("enc");
        assert_eq!(from_slice.decrypt_event(sealed).expect("same key"), event());

        let a = FieldCipher::from_passphrase_with("correct horse", b"my-app/user_data", CHEAP)
            .expect("kdf");
        let b = FieldCipher::from_passphrase_with("correct horse", b"my-app/user_data", CHEAP)
            .expect("kdf");
        let c = FieldCipher::from_passphrase_with("battery staple", b"my-app/user_data", CHEAP)
            .expect("kdf");
        let sealed = a.encrypt_event(event()).expect("enc");
        assert_eq!(
            b.decrypt_event(sealed.clone()).expect("same passphrase"),
            event()
        );
        assert!(matches!(c.decrypt_event(sealed), Err(Error::Decrypt)));
        assert!(matches!(
            FieldCipher::from_passphrase_with("pw", b"short", CHEAP),
            Err(Error::Kdf(_))
        ));
        assert!(!format!("{a:?}").contains('9'));
    }

    #[test]
    fn absurd_kdf_costs_and_empty_passphrases_are_typed_errors() {
        // 4 TiB of Argon2 memory: an allocation failure would abort the process.
        let absurd = KdfParams {
            memory_kib: u32::MAX,
            iterations: 1,
        };
        assert!(matches!(
            FieldCipher::from_passphrase_with("pw", b"my-app/user_data", absurd),
            Err(Error::Kdf(m)) if m.contains("memory")
        ));
        let at_the_cap = KdfParams {
            memory_kib: MAX_KDF_MEMORY_KIB + 1,
            iterations: 1,
        };
        assert!(FieldCipher::from_passphrase_with("pw", b"my-app/user_data", at_the_cap).is_err());
        // An empty passphrase (an unset variable read as "") is a key anyone can derive.
        assert!(matches!(
            FieldCipher::from_passphrase_with("", b"my-app/user_data", CHEAP),
            Err(Error::Kdf(m)) if m.contains("empty")
        ));
    }

    #[test]
    fn middlewares_select_types_and_round_trip_through_two_pipelines() {
        let cipher = FieldCipher::from_key([3; 32]);
        let sender = Pipeline::new();
        sender.use_middleware(
            Direction::Outgoing,
            Encrypt::new(cipher.clone()).only_types(["user_data"]),
        );
        let receiver = Pipeline::new();
        receiver.use_middleware(
            Direction::Incoming,
            Decrypt::new(cipher).only_types(["user_data"]),
        );

        let public = Event::new("p", "page_view", json!({"path": "/"}), 5);
        let wire = sender
            .run(Direction::Outgoing, public.clone())
            .expect("ok")
            .expect("kept");
        assert_eq!(wire, public, "other types pass unchanged");

        let wire = sender
            .run(Direction::Outgoing, event())
            .expect("ok")
            .expect("kept");
        assert!(FieldCipher::is_encrypted(&wire.data));
        // Through JSON, as a transport would carry it.
        let wire: Event =
            serde_json::from_str(&serde_json::to_string(&wire).expect("ser")).expect("de");
        let back = receiver
            .run(Direction::Incoming, wire)
            .expect("ok")
            .expect("kept");
        assert_eq!(back, event());

        // A plain user_data event arriving is refused with the middleware's name.
        let err = receiver
            .run(Direction::Incoming, event())
            .expect_err("plain data refused");
        assert!(matches!(err, MiddlewareError::Failed { ref name, .. } if name == "decrypt"));

        // A receiver with another key fails, typed.
        let eve = Pipeline::new();
        eve.use_middleware(
            Direction::Incoming,
            Decrypt::new(FieldCipher::from_key([4; 32])),
        );
        let wire = sender
            .run(Direction::Outgoing, event())
            .expect("ok")
            .expect("kept");
        let err = eve.run(Direction::Incoming, wire).expect_err("wrong key");
        assert!(err.to_string().contains("decryption failed"), "{err}");
    }
}
