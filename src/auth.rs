//! Authentication of `Connect`: HS256 JWTs whose `sub` is the uid, or no
//! authentication at all when the configuration explicitly says so.

use crate::config::{AuthConfig, AuthMode};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    iat: u64,
}

/// Why a token was refused. The client only ever sees `AuthFailed`; the
/// detail goes to the server log.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no token")]
    Missing,
    #[error("token rejected: {0}")]
    Invalid(String),
    #[error("token is for uid {token_uid:?}, not {uid:?}")]
    WrongUid { token_uid: String, uid: String },
}

/// Checks tokens. Cheap to clone into every shard.
#[derive(Clone)]
pub struct Authenticator {
    mode: AuthMode,
    /// `None` without `auth.secret`: no signed token is accepted (only
    /// tokens registered through the admin API, checked by the shard).
    key: Option<DecodingKey>,
    validation: Validation,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Authenticator {
    pub fn new(config: &AuthConfig) -> Authenticator {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = config.leeway_s;
        validation.set_required_spec_claims(&["exp", "sub"]);
        Authenticator {
            mode: config.mode,
            key: (!config.secret.is_empty())
                .then(|| DecodingKey::from_secret(config.secret.as_bytes())),
            validation,
        }
    }

    /// Accepts `token` as proof that the client is `uid`.
    pub fn check(&self, uid: &str, token: &str) -> Result<(), AuthError> {
        if self.mode == AuthMode::Off {
            return Ok(());
        }
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let Some(key) = &self.key else {
            return Err(AuthError::Invalid(
                "no auth.secret: signed tokens are off".into(),
            ));
        };
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        if data.claims.sub != uid {
            return Err(AuthError::WrongUid {
                token_uid: data.claims.sub,
                uid: uid.to_owned(),
            });
        }
        Ok(())
    }
}

/// Compares two secrets in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Signs a token for `uid` valid for `ttl_s` seconds from `now_unix_s`.
pub fn issue_token(secret: &str, uid: &str, now_unix_s: u64, ttl_s: u64) -> String {
    let claims = Claims {
        sub: uid.to_owned(),
        exp: now_unix_s + ttl_s,
        iat: now_unix_s,
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing of a plain struct cannot fail")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn auth(secret: &str) -> Authenticator {
        Authenticator::new(&AuthConfig {
            mode: AuthMode::Token,
            secret: secret.into(),
            leeway_s: 0,
        })
    }

    fn now() -> u64 {
        crate::time::unix_now_ms() / 1000
    }

    #[test]
    fn accepts_a_fresh_token_for_its_own_uid_only() {
        let token = issue_token("s3cret", "alice", now(), 60);
        assert_eq!(auth("s3cret").check("alice", &token), Ok(()));
        assert!(matches!(
            auth("s3cret").check("bob", &token),
            Err(AuthError::WrongUid { .. })
        ));
    }

    #[test]
    fn refuses_expired_foreign_and_missing_tokens() {
        let expired = issue_token("s3cret", "alice", now() - 3600, 60);
        assert!(auth("s3cret").check("alice", &expired).is_err());
        let foreign = issue_token("other", "alice", now(), 60);
        assert!(auth("s3cret").check("alice", &foreign).is_err());
        assert_eq!(auth("s3cret").check("alice", ""), Err(AuthError::Missing));
        assert!(auth("s3cret").check("alice", "not.a.jwt").is_err());
    }

    #[test]
    fn without_a_secret_no_signed_token_is_accepted_not_even_one_signed_with_the_empty_key() {
        let empty = issue_token("", "alice", now(), 60);
        assert!(auth("").check("alice", &empty).is_err());
    }

    #[test]
    fn off_mode_accepts_anyone() {
        let a = Authenticator::new(&AuthConfig {
            mode: AuthMode::Off,
            secret: String::new(),
            leeway_s: 0,
        });
        assert_eq!(a.check("anyone", ""), Ok(()));
    }
}
