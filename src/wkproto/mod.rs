//! WuKongIM's binary protocol (WKProto), so WuKongIM apps connect to ruyi
//! unchanged.
//!
//! - [`codec`]: the packets and their byte layouts, versions 2 to 6.
//! - [`crypto`]: the per-connection key agreement and payload encryption
//!   the SDKs require.
//! - [`translate`]: one connection's translator between WKProto packets and
//!   ruyi frames, with no I/O; [`io`]: the translator over a socket or a
//!   WebSocket, as the byte stream the connection driver reads and writes.
pub mod codec;
pub mod crypto;
pub mod io;
pub mod translate;
