//! WuKongIM's binary protocol (WKProto), so WuKongIM apps connect to ruyi
//! unchanged.
//!
//! - [`crypto`]: the per-connection key agreement and payload encryption
//!   the SDKs require.
pub mod crypto;
