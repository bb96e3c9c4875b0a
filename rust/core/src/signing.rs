//! Signed sessions: a keyed BLAKE3 MAC over the whole session, for stores that others can write to.
//!
//! The checksum of every session proves only that nobody changed the bytes *by accident*: anyone who can
//! write the file can recompute it. A session saved with a [`SessionKey`] ends with a 32-byte MAC over every
//! byte before it (prelude, header, state and checksum), and a load with the key refuses anything that the
//! key did not sign, before it parses a byte of the header.

/// Signature scheme recorded in the header of a signed session.
pub const SCHEME: &str = "blake3-keyed-256";
/// Bytes of the MAC at the end of a signed session.
pub const MAC_LEN: usize = 32;
/// Shortest secret accepted: 128 bits.
pub const MIN_SECRET_LEN: usize = 16;
/// BLAKE3's key derivation context: binds keys to this use, so that the same secret used elsewhere yields
/// unrelated MACs.
const KEY_CONTEXT: &str = "llama-sessions 2026-11 session signature v1";

/// A key that signs and verifies sessions, derived from the caller's secret (any length of at least
/// [`MIN_SECRET_LEN`] bytes). Its `Debug` output never shows the key.
#[derive(Clone)]
pub struct SessionKey {
    key: [u8; 32],
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKey(..)")
    }
}

impl SessionKey {
    /// Derives the key from `secret`.
    pub fn new(secret: &[u8]) -> crate::Result<SessionKey> {
        if secret.len() < MIN_SECRET_LEN {
            return Err(crate::Error::invalid(
                "secret_key",
                format!(
                    "at least {MIN_SECRET_LEN} bytes (use os.urandom(32) or a secrets manager)"
                ),
                format!("{} bytes", secret.len()),
            ));
        }
        Ok(SessionKey {
            key: blake3::derive_key(KEY_CONTEXT, secret),
        })
    }

    /// A hasher for a MAC computed in pieces (while a file is read).
    pub fn hasher(&self) -> blake3::Hasher {
        blake3::Hasher::new_keyed(&self.key)
    }

    /// The MAC of `bytes`.
    pub fn mac(&self, bytes: &[u8]) -> blake3::Hash {
        let mut hasher = self.hasher();
        if bytes.len() >= 1 << 20 {
            // Large sessions: hash on every core (BLAKE3's tree mode gives the same result).
            hasher.update_rayon(bytes);
        } else {
            hasher.update(bytes);
        }
        hasher.finalize()
    }
}
