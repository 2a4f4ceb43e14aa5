//! What several benchmarks share.

use ruyi::protocol::{ChannelType, RecvFields};

/// The fields of one chat message's `Recv`, as alice's phone would get it.
pub fn chat_recv(payload: &[u8]) -> RecvFields<'_> {
    RecvFields {
        message_id: 383_070_201_245_077_504,
        message_seq: 42,
        client_msg_no: "74328f29cab872e731d84843c83f9318",
        from_uid: "alice",
        channel_id: "alice",
        channel_type: ChannelType::Person,
        timestamp_ms: 1_795_398_253_077,
        flags: 0,
        send_flags: 0,
        payload,
    }
}
