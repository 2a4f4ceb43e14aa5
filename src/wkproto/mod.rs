//! WuKongIM's binary protocol (WKProto), so WuKongIM apps connect to ruyi
//! unchanged.
//!
//! - [`codec`]: the packets and their byte layouts, versions 2 to 6.
//! - [`crypto`]: the per-connection key agreement and payload encryption
//!   the SDKs require.
//! - [`translate`]: one connection's translator between WKProto packets and
//!   ruyi frames, with no I/O.
pub mod codec;
pub mod crypto;
pub mod translate;
