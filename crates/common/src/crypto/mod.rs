//! Encryption at rest: keys, key files, and the sealed-object envelope.
//!
//! An encrypted archive stores every object except its root manifest
//! ([`crate::layout::MANIFEST_NAME`]) inside an envelope: a clear header
//! naming the key, then the object's bytes in chunks sealed with
//! XChaCha20-Poly1305 in the STREAM construction (Hoang, Reyhanitabar,
//! Rogaway, Vizár 2015). The envelope is orthogonal to the segment, snapshot
//! and record formats: [`crate::store::Archive`] seals on write and opens on
//! read, so their decoders see exactly the plaintext of an unencrypted
//! archive.
//!
//! ```text
//! offset size field
//!      0    8 magic            b"EPITRENC"
//!      8    1 envelope version 1
//!      9    1 algorithm        1 = XChaCha20-Poly1305, STREAM
//!     10    1 chunk size       log2 of the plaintext chunk size (16: 64 KiB)
//!     11    5 reserved         zero
//!     16    8 key id           see [`KeyId`]
//!     24   15 nonce prefix     random, fresh for every object
//!     39    1 reserved         zero
//!     40    … chunks           each: ciphertext of up to 64 KiB, then a 16-byte tag
//! ```
//!
//! Chunk `i` (from 0) is sealed with nonce `prefix ‖ i as u64 BE ‖ last`,
//! where `last` is 1 for the final chunk and 0 otherwise, and associated
//! data `header ‖ object name` (the archive-relative name, e.g.
//! `gen-…/segments/….seg`). Every chunk but the last holds exactly 64 KiB;
//! the last holds 0..=64 KiB (0 only for an empty object). So reordered,
//! dropped, repeated or appended chunks, a cut at a chunk boundary, a changed
//! header, and a body moved under another object's name all fail
//! authentication. Objects are processed a chunk at a time: memory stays
//! bounded however large the object.
//!
//! Keys are 32 random bytes. The cipher key and the [`KeyId`] are derived
//! from them with blake3's key derivation under distinct contexts, so the
//! id reveals nothing about the key. A key file holds the 32 bytes in
//! standard base64 (`head -c 32 /dev/urandom | base64`); surrounding
//! whitespace is ignored.

mod envelope;
mod key;

pub use envelope::{
    open, open_prefix, seal, sealed_key_id, stored_prefix_len, CryptoError, Opener, Sealer, MAGIC,
    SCHEME,
};
pub use key::{ArchiveKey, KeyError, KeyId, Keyring, KEY_BYTES};

/// What an encryption failure means for the caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoFault {
    /// The keys given do not suit the archive or its objects (missing,
    /// unreadable, malformed, or not the key an object names): the caller's
    /// to fix.
    WrongKeys,
    /// A sealed object is damaged (fails authentication, malformed or
    /// missing envelope).
    Damaged,
}

/// The encryption failure one cause of an error chain reports, if any
/// (looking inside the store and listing errors that wrap one
/// transparently).
pub fn fault_of(cause: &(dyn std::error::Error + 'static)) -> Option<CryptoFault> {
    use crate::listing::ListingError;
    use crate::prune::PruneError;
    use crate::store::StoreError;
    if cause.is::<KeyError>() {
        return Some(CryptoFault::WrongKeys);
    }
    // A prune's errors wrap the listing's and the store's transparently.
    match cause.downcast_ref::<PruneError>() {
        Some(PruneError::Listing(e)) => return fault_of(e),
        Some(PruneError::Store(e)) => return fault_of(e),
        _ => {}
    }
    let ((Some(crypto), _, _)
    | (_, Some(StoreError::Crypto(crypto)), _)
    | (
        _,
        _,
        Some(ListingError::Keys(crypto) | ListingError::Store(StoreError::Crypto(crypto))),
    )) = (
        cause.downcast_ref::<CryptoError>(),
        cause.downcast_ref::<StoreError>(),
        cause.downcast_ref::<ListingError>(),
    )
    else {
        return None;
    };
    Some(if crypto.is_key_problem() {
        CryptoFault::WrongKeys
    } else {
        CryptoFault::Damaged
    })
}
