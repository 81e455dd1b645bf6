//! Frames: a u32 big-endian length, then a bincode 2 payload (standard
//! configuration: variable-length integers). The length is
//! checked against `MAX_FRAME_LEN` before anything is allocated.

use bytes::Bytes;
use serde::{de::DeserializeOwned, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

/// Largest payload either side accepts. Status reports of large pools are the
/// biggest messages; a lease is a few dozen bytes.
pub const MAX_FRAME_LEN: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("cannot encode message")]
    Encode(#[source] bincode::error::EncodeError),
    #[error("undecodable message")]
    Decode(#[source] bincode::error::DecodeError),
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_FRAME_LEN>()
}

pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, CodecError> {
    bincode::serde::encode_to_vec(msg, config()).map_err(CodecError::Encode)
}

/// Decodes a whole frame; bytes left over are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, CodecError> {
    let (msg, used) = decode_prefix(bytes)?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(msg)
}

/// Decodes a message from the start of a frame and says how many bytes it
/// used; for `Hello`, which newer minors may extend at the end.
pub fn decode_prefix<T: DeserializeOwned>(bytes: &[u8]) -> Result<(T, usize), CodecError> {
    bincode::serde::decode_from_slice(bytes, config()).map_err(CodecError::Decode)
}

pub(crate) fn framing() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_type::<u32>()
        .big_endian()
        .max_frame_length(MAX_FRAME_LEN)
        .new_codec()
}

pub(crate) fn to_bytes<T: Serialize>(msg: &T) -> Result<Bytes, CodecError> {
    encode(msg).map(Bytes::from)
}
