//! The `Hello` exchange that opens every connection: the client speaks first,
//! the allocator answers `Accepted` or `Refused` with a reason.

use tokio::io::{AsyncRead, AsyncWrite};

use crate::channel::{Channel, ChannelError};
use crate::codec;
use crate::message::{ClientFrame, Hello, HelloReply, ServerFrame, PROTOCOL_MAJOR};

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("peer closed the connection during the handshake")]
    Closed,
    #[error("peer's first frame was not a Hello")]
    NotHello,
    #[error("peer speaks protocol {theirs}.x, this side {ours}.x")]
    VersionMismatch { ours: u16, theirs: u16 },
    #[error("allocator refused the connection: {0}")]
    Refused(String),
}

/// Client side: send `hello`, wait for the allocator's answer.
pub async fn client_handshake<S>(
    chan: &mut Channel<S, ClientFrame, ServerFrame>,
    hello: Hello,
) -> Result<Hello, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    chan.send(&ClientFrame::Hello(hello)).await?;
    let frame = chan.recv_raw().await?.ok_or(HandshakeError::Closed)?;
    // `decode_prefix`: a newer minor may have appended fields to its Hello.
    let (reply, _) = codec::decode_prefix::<ServerFrame>(&frame).map_err(ChannelError::from)?;
    match reply {
        ServerFrame::Hello(HelloReply::Accepted(server)) if server.major == PROTOCOL_MAJOR => {
            Ok(server)
        }
        ServerFrame::Hello(HelloReply::Accepted(server)) => Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_MAJOR,
            theirs: server.major,
        }),
        ServerFrame::Hello(HelloReply::Refused { reason, .. }) => {
            Err(HandshakeError::Refused(reason))
        }
        ServerFrame::Response(_) => Err(HandshakeError::NotHello),
    }
}

/// Server side: read the client's `Hello`; refuse another major with a
/// reason the client can print. Returns the client's `Hello` once accepted.
pub async fn server_handshake<S>(
    chan: &mut Channel<S, ServerFrame, ClientFrame>,
    ours: Hello,
) -> Result<Hello, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = chan.recv_raw().await?.ok_or(HandshakeError::Closed)?;
    // The variant index and the two version numbers are frozen, so they can
    // be read even when the rest of another major's Hello cannot.
    let (variant, major, minor) = codec::decode_prefix::<(u32, u16, u16)>(&frame)
        .map_err(ChannelError::from)?
        .0;
    if variant != 0 {
        return Err(HandshakeError::NotHello);
    }
    if major != PROTOCOL_MAJOR {
        let reason = format!(
            "allocator speaks protocol {}.{}, client {major}.{minor}: upgrade them together",
            ours.major, ours.minor
        );
        chan.send(&ServerFrame::Hello(HelloReply::Refused {
            reason,
            server: ours,
        }))
        .await?;
        return Err(HandshakeError::VersionMismatch {
            ours: PROTOCOL_MAJOR,
            theirs: major,
        });
    }
    let theirs = match codec::decode_prefix::<ClientFrame>(&frame).map_err(ChannelError::from)? {
        (ClientFrame::Hello(h), _) => h,
        (ClientFrame::Request(_), _) => return Err(HandshakeError::NotHello),
    };
    chan.send(&ServerFrame::Hello(HelloReply::Accepted(ours)))
        .await?;
    Ok(theirs)
}
