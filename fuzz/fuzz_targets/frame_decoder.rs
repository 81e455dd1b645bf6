//! Arbitrary bytes into the allocator protocol decoders: a message or a
//! clean error, never a panic or an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rotor_protocol::{decode, decode_prefix, ClientFrame, ServerFrame};

fuzz_target!(|data: &[u8]| {
    let _ = decode::<ClientFrame>(data);
    let _ = decode::<ServerFrame>(data);
    let _ = decode_prefix::<(u32, u16, u16)>(data);
});
