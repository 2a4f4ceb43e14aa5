//! Login: the checks a `Connect` must pass before its connection has an
//! identity: protocol version, ids, device flag, never the system uid, and a
//! token that the configured authenticator accepts or that was registered
//! through the admin API for this uid and device flag.

use crate::auth::Authenticator;
use crate::channel::valid_uid;
use crate::config::Limits;
use crate::conn::session::Identity;
use crate::ids::Uid;
use crate::protocol::{Connect, DeviceFlag, ReasonCode, PROTOCOL_VERSION};
use crate::storage::ShardStore;
use std::sync::Arc;

/// Why a login was refused: the reason for the client, and a detail for
/// the client and the log. Authentication failures say no more than that.
#[derive(Debug)]
pub(super) struct Refused(pub ReasonCode, pub String);

/// The identity `connect` proves, or why not.
pub(super) fn check_connect(
    connect: &Connect,
    limits: &Limits,
    system_uid: Option<&Uid>,
    auth: &Authenticator,
    store: &mut dyn ShardStore,
) -> Result<Identity, Refused> {
    if connect.version != PROTOCOL_VERSION {
        return Err(Refused(
            ReasonCode::UnsupportedVersion,
            format!(
                "protocol version {} is not supported; this server speaks {PROTOCOL_VERSION}",
                connect.version
            ),
        ));
    }
    if !valid_uid(&connect.uid, limits.uid_length_max_bytes)
        || !valid_uid(&connect.device_id, limits.device_id_length_max_bytes)
    {
        return Err(Refused(
            ReasonCode::InvalidUid,
            "uid and device_id must be 1 to the configured maximum bytes, without '@' or control characters".into(),
        ));
    }
    if connect.device_flag.0 > DeviceFlag::ENUM_MAX {
        return Err(Refused(
            ReasonCode::MalformedFrame,
            "device_flag must be 0 (app), 1 (web) or 2 (desktop)".into(),
        ));
    }
    let failed = || Refused(ReasonCode::AuthFailed, "authentication failed".into());
    if system_uid.is_some_and(|system| system.as_str() == connect.uid) {
        tracing::info!(uid = %connect.uid, "refused: the system uid cannot log in");
        return Err(failed());
    }
    if let Err(error) = auth.check(&connect.uid, &connect.token) {
        // A token registered through the admin API (`POST /user/token`)
        // for this uid and device flag is the other way in.
        if connect.token.is_empty() {
            tracing::info!(uid = %connect.uid, %error, "authentication failed");
            return Err(failed());
        }
        let registered = store
            .user_token(&Uid::new(&connect.uid), connect.device_flag.0)
            .map_err(|storage| {
                tracing::warn!(%storage, "reading a registered token failed");
                Refused(
                    ReasonCode::StorageError,
                    "cannot check the token now".into(),
                )
            })?;
        let matches = registered.is_some_and(|stored| {
            !stored.is_empty()
                && crate::auth::constant_time_eq(stored.as_bytes(), connect.token.as_bytes())
        });
        if !matches {
            tracing::info!(uid = %connect.uid, %error, "authentication failed");
            return Err(failed());
        }
    }
    Ok(Identity {
        uid: Uid::new(&connect.uid),
        device_id: Arc::from(connect.device_id.as_str()),
        device_flag: connect.device_flag,
    })
}
