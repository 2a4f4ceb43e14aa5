//! The encryption WuKongIM's SDKs require (they cannot turn it off).
//!
//! Per connection: the client sends an X25519 public key in CONNECT, the
//! server answers with its own and a 16-character salt in CONNACK, and
//! both derive the same AES-128 key from the shared secret:
//!
//! - key = the first 16 characters of hex(MD5(base64(shared secret)));
//! - IV = the salt;
//! - payloads travel as the base64 text of AES-128-CBC (PKCS#7) ciphertext;
//! - a packet's `msgKey` = hex(MD5(base64(AES(sign string)))), where the
//!   sign string joins the packet's fields in WuKongIM's order (see
//!   `super::codec`).
//!
//! The algorithms come from RustCrypto's `aes`, `cbc` and `md-5` and from
//! `x25519-dalek`; this file only composes them as the SDKs do.

use aes::cipher::{block_padding::Pkcs7, BlockDecryptMut, BlockEncryptMut, KeyIvInit};
use base64::Engine as _;
use md5::{Digest, Md5};

type Encryptor = cbc::Encryptor<aes::Aes128>;
type Decryptor = cbc::Decryptor<aes::Aes128>;

const BASE64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Length of the salt (the IV) in characters, which are its bytes.
pub const SALT_LEN: usize = 16;

/// Why a client's key or ciphertext was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("the client key is not base64 of a 32-byte X25519 public key")]
    BadClientKey,
    #[error("the payload is not base64")]
    NotBase64,
    #[error("the payload does not decrypt (wrong key, length or padding)")]
    Undecryptable,
}

/// The server's half of one connection's key agreement.
pub struct Handshake {
    secret: x25519_dalek::StaticSecret,
    public: x25519_dalek::PublicKey,
}

impl Handshake {
    /// A fresh key pair from the operating system's random source.
    pub fn new() -> std::io::Result<Handshake> {
        let mut bytes = [0u8; 32];
        getrandom::getrandom(&mut bytes).map_err(std::io::Error::other)?;
        Ok(Handshake::from_secret(bytes))
    }

    /// A key pair from fixed secret bytes (tests and vectors).
    pub fn from_secret(bytes: [u8; 32]) -> Handshake {
        let secret = x25519_dalek::StaticSecret::from(bytes);
        let public = x25519_dalek::PublicKey::from(&secret);
        Handshake { secret, public }
    }

    /// The server key CONNACK carries: base64 of the public key.
    pub fn server_key(&self) -> String {
        BASE64.encode(self.public.as_bytes())
    }

    /// The session's cipher, from the client's key (base64 of its X25519
    /// public key) and the salt sent in CONNACK.
    pub fn agree(&self, client_key: &str, salt: [u8; SALT_LEN]) -> Result<Cipher, CryptoError> {
        let client: [u8; 32] = BASE64
            .decode(client_key.trim())
            .ok()
            .and_then(|bytes| bytes.try_into().ok())
            .ok_or(CryptoError::BadClientKey)?;
        let shared = self
            .secret
            .diffie_hellman(&x25519_dalek::PublicKey::from(client));
        Ok(Cipher::from_shared_secret(shared.as_bytes(), salt))
    }
}

/// A fresh salt: 16 random characters from an alphabet the SDKs accept
/// as a string.
pub fn new_salt() -> std::io::Result<[u8; SALT_LEN]> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; SALT_LEN];
    getrandom::getrandom(&mut bytes).map_err(std::io::Error::other)?;
    // 62 symbols: the modulo bias (256 % 62) does not matter for an IV.
    Ok(bytes.map(|b| ALPHABET[usize::from(b) % ALPHABET.len()]))
}

/// One connection's AES-128-CBC key and IV.
#[derive(Clone)]
pub struct Cipher {
    key: [u8; 16],
    iv: [u8; 16],
}

impl std::fmt::Debug for Cipher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cipher { .. }")
    }
}

impl Cipher {
    /// key = the first 16 characters of hex(MD5(base64(shared secret))),
    /// IV = the salt.
    pub fn from_shared_secret(shared: &[u8], salt: [u8; SALT_LEN]) -> Cipher {
        let digest = md5_hex(BASE64.encode(shared).as_bytes());
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest.as_bytes()[..16]);
        Cipher { key, iv: salt }
    }

    /// AES-128-CBC with PKCS#7 padding.
    pub fn encrypt(&self, plain: &[u8]) -> Vec<u8> {
        Encryptor::new(&self.key.into(), &self.iv.into()).encrypt_padded_vec_mut::<Pkcs7>(plain)
    }

    /// The inverse of [`Cipher::encrypt`].
    pub fn decrypt(&self, cipher: &[u8]) -> Result<Vec<u8>, CryptoError> {
        Decryptor::new(&self.key.into(), &self.iv.into())
            .decrypt_padded_vec_mut::<Pkcs7>(cipher)
            .map_err(|_| CryptoError::Undecryptable)
    }

    /// A payload as it travels: base64 text of its ciphertext.
    pub fn seal(&self, plain: &[u8]) -> Vec<u8> {
        BASE64.encode(self.encrypt(plain)).into_bytes()
    }

    /// The plaintext of a payload that travelled as [`Cipher::seal`] made
    /// it.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let cipher = BASE64
            .decode(trim_ascii(sealed))
            .map_err(|_| CryptoError::NotBase64)?;
        self.decrypt(&cipher)
    }

    /// hex(MD5(base64(AES(sign string)))).
    pub fn msg_key(&self, sign: &[u8]) -> String {
        md5_hex(BASE64.encode(self.encrypt(sign)).as_bytes())
    }
}

fn trim_ascii(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    let end = bytes
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |i| i + 1);
    &bytes[start..end]
}

/// Lower-case hex of the MD5 digest of `bytes`.
pub fn md5_hex(bytes: &[u8]) -> String {
    let digest = Md5::digest(bytes);
    let mut out = String::with_capacity(32);
    for byte in digest {
        use std::fmt::Write as _;
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_hex_matches_the_rfc_1321_vectors() {
        assert_eq!(md5_hex(b""), "d41d8cd98f00b204e9800998ecf8427e");
        assert_eq!(md5_hex(b"abc"), "900150983cd24fb0d6963f7d28e17f72");
    }

    /// The vector was computed with WuKongIM's JS SDK 1.0.4 code and
    /// checked against Node's own X25519 and AES.
    #[test]
    fn the_sdks_vector_gives_the_same_key_payload_and_msg_key() {
        let client = Handshake::from_secret(*b"0123456789abcdef0123456789abcdef");
        assert_eq!(
            client.server_key(),
            "hlF7wMOf6Ha3ZGy1407gPa9xzLrWdFDBapcK2MvAPn4="
        );
        let server = Handshake::from_secret(std::array::from_fn(|i| i as u8 + 1));
        assert_eq!(
            server.server_key(),
            "B6N8vBQgk8i3VdwbEOhstCY3StFqqFPtC9/AsrhtHHw="
        );
        let cipher = server
            .agree(&client.server_key(), *b"abcdef1234567890")
            .unwrap();
        assert_eq!(&cipher.key, b"4989ad64ccaf943d");
        let payload = cipher.seal(br#"{"content":"hello","type":1}"#);
        assert_eq!(payload, b"tgAZMD20uUdoHwMWD1ribc5ZCeh+RmrAMFHHDXbkq4E=");
        let sign = [b"1cmn0001u21".as_slice(), &payload].concat();
        assert_eq!(cipher.msg_key(&sign), "fe5deeeb6cd77367b899be26c6284bb4");
        let recv_payload = b"qEjs4VIhNtY3hrFMxPnMYeixsO/sLEZF73YR+Jb54AA=";
        assert_eq!(
            cipher.open(recv_payload).unwrap(),
            br#"{"content":"hi","type":1}"#
        );
        let sign = [
            b"12345678901234567897cmn00021700000000u2u21".as_slice(),
            recv_payload,
        ]
        .concat();
        assert_eq!(cipher.msg_key(&sign), "ef7077312d29f1279740e86f99c7e701");
    }

    #[test]
    fn both_sides_derive_the_same_cipher() {
        let server = Handshake::from_secret([7; 32]);
        let client = Handshake::from_secret([9; 32]);
        let salt = *b"0123456789abcdef";
        let at_server = server.agree(&client.server_key(), salt).unwrap();
        let at_client = client.agree(&server.server_key(), salt).unwrap();
        assert_eq!(at_server.key, at_client.key);
        let sealed = at_client.seal(br#"{"content":"hello","type":1}"#);
        assert_eq!(
            at_server.open(&sealed).unwrap(),
            br#"{"content":"hello","type":1}"#
        );
        assert_eq!(at_server.msg_key(b"sign"), at_client.msg_key(b"sign"));
    }

    #[test]
    fn the_key_is_sixteen_hex_characters_of_the_md5_of_the_base64_secret() {
        let cipher = Cipher::from_shared_secret(&[1, 2, 3], *b"aaaaaaaaaaaaaaaa");
        // base64([1, 2, 3]) = "AQID"; md5("AQID") starts with these 16.
        assert_eq!(&cipher.key, &md5_hex(b"AQID").as_bytes()[..16]);
    }

    #[test]
    fn bad_keys_and_ciphertexts_are_errors_not_panics() {
        let server = Handshake::from_secret([7; 32]);
        let salt = *b"0123456789abcdef";
        assert_eq!(
            server.agree("not base64!", salt).unwrap_err(),
            CryptoError::BadClientKey
        );
        assert_eq!(
            server.agree(&BASE64.encode([1u8; 31]), salt).unwrap_err(),
            CryptoError::BadClientKey
        );
        let cipher = Cipher::from_shared_secret(&[1; 32], salt);
        assert_eq!(cipher.open(b"%%%").unwrap_err(), CryptoError::NotBase64);
        assert_eq!(
            cipher
                .open(BASE64.encode([0u8; 15]).as_bytes())
                .unwrap_err(),
            CryptoError::Undecryptable
        );
    }

    #[test]
    fn salts_are_sixteen_alphanumeric_characters() {
        let salt = new_salt().unwrap();
        assert!(salt.iter().all(u8::is_ascii_alphanumeric));
    }
}
