//! WuKongIM's binary protocol (WKProto), so WuKongIM apps connect to ruyi
//! unchanged.
//!
//! - [`codec`]: the packets and their byte layouts, versions 2 to 6.
//! - [`crypto`]: the per-connection key agreement and payload encryption
//!   the SDKs require.
pub mod codec;
pub mod crypto;
