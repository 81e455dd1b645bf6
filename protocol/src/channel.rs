//! A typed, framed channel: `Channel<S, Tx, Rx>` can only send `Tx` and
//! receive `Rx`, so a worker cannot send a response by mistake.

use std::marker::PhantomData;

use futures_util::{SinkExt, StreamExt};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadHalf, WriteHalf};
use tokio_util::codec::{Decoder, FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::codec::{self, CodecError};

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("i/o error on the channel")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Codec(#[from] CodecError),
}

impl ChannelError {
    /// Whether the peer sent something this side cannot read (as opposed to
    /// the connection failing).
    pub fn is_protocol_violation(&self) -> bool {
        match self {
            ChannelError::Codec(_) => true,
            // LengthDelimitedCodec reports an oversized frame as InvalidData;
            // a close in the middle of a frame is `decode_eof`'s.
            ChannelError::Io(e) => matches!(
                e.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ),
        }
    }
}

pub struct Channel<S, Tx, Rx> {
    tx: ChannelTx<WriteHalf<S>, Tx>,
    rx: ChannelRx<ReadHalf<S>, Rx>,
}

pub struct ChannelTx<W, Tx> {
    inner: FramedWrite<W, LengthDelimitedCodec>,
    _tx: PhantomData<fn(Tx)>,
}

pub struct ChannelRx<R, Rx> {
    inner: FramedRead<R, Framing>,
    _rx: PhantomData<fn() -> Rx>,
}

/// The length-delimited decoder, and whether a frame has begun and not
/// ended: the codec takes a frame's length out of the buffer once read, so
/// the buffer alone cannot tell a stalled frame from none.
struct Framing {
    codec: LengthDelimitedCodec,
    begun: bool,
}

impl Decoder for Framing {
    type Item = bytes::BytesMut;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        let had_bytes = !src.is_empty();
        let frame = self.codec.decode(src)?;
        self.begun = match frame {
            Some(_) => !src.is_empty(),
            None => self.begun || had_bytes,
        };
        Ok(frame)
    }

    /// At the end of the stream: a frame begun and not ended is an error
    /// (the peer closed in the middle of one), not a clean close.
    fn decode_eof(&mut self, src: &mut bytes::BytesMut) -> Result<Option<Self::Item>, Self::Error> {
        match self.decode(src)? {
            Some(frame) => Ok(Some(frame)),
            None if self.begun => Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed in the middle of a frame",
            )),
            None => Ok(None),
        }
    }
}

impl<S, Tx, Rx> Channel<S, Tx, Rx>
where
    S: AsyncRead + AsyncWrite + Unpin,
    Tx: Serialize,
    Rx: DeserializeOwned,
{
    pub fn new(stream: S) -> Self {
        let (r, w) = tokio::io::split(stream);
        Channel {
            tx: ChannelTx {
                inner: FramedWrite::new(w, codec::framing()),
                _tx: PhantomData,
            },
            rx: ChannelRx {
                inner: FramedRead::new(
                    r,
                    Framing {
                        codec: codec::framing(),
                        begun: false,
                    },
                ),
                _rx: PhantomData,
            },
        }
    }

    pub async fn send(&mut self, msg: &Tx) -> Result<(), ChannelError> {
        self.tx.send(msg).await
    }

    pub async fn recv(&mut self) -> Result<Option<Rx>, ChannelError> {
        self.rx.recv().await
    }

    pub(crate) async fn recv_raw(&mut self) -> Result<Option<bytes::BytesMut>, ChannelError> {
        self.rx.recv_raw().await
    }

    pub fn split(self) -> (ChannelTx<WriteHalf<S>, Tx>, ChannelRx<ReadHalf<S>, Rx>) {
        (self.tx, self.rx)
    }
}

impl<W: AsyncWrite + Unpin, Tx: Serialize> ChannelTx<W, Tx> {
    /// Sends and flushes one message.
    pub async fn send(&mut self, msg: &Tx) -> Result<(), ChannelError> {
        self.inner.send(codec::to_bytes(msg)?).await?;
        Ok(())
    }

    /// Queues one message without flushing; call `flush` after a batch.
    pub async fn feed(&mut self, msg: &Tx) -> Result<(), ChannelError> {
        self.inner.feed(codec::to_bytes(msg)?).await?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ChannelError> {
        SinkExt::<bytes::Bytes>::flush(&mut self.inner).await?;
        Ok(())
    }
}

impl<R: AsyncRead + Unpin, Rx: DeserializeOwned> ChannelRx<R, Rx> {
    /// The next message, or `None` when the peer closed cleanly between
    /// frames.
    pub async fn recv(&mut self) -> Result<Option<Rx>, ChannelError> {
        match self.recv_raw().await? {
            Some(frame) => Ok(Some(codec::decode(&frame)?)),
            None => Ok(None),
        }
    }

    pub(crate) async fn recv_raw(&mut self) -> Result<Option<bytes::BytesMut>, ChannelError> {
        match self.inner.next().await {
            Some(Ok(frame)) => Ok(Some(frame)),
            Some(Err(e)) => Err(e.into()),
            None => Ok(None),
        }
    }

    /// Whether part of a frame has come and the rest not yet (what a peer
    /// that stopped in the middle of one holds: the frame's room is
    /// reserved once its length is read).
    pub fn mid_frame(&self) -> bool {
        self.inner.decoder().begun
    }

    /// Whether a whole frame is already buffered, so a server can batch its
    /// replies and flush once when it has read everything that came in.
    pub fn has_complete_frame(&self) -> bool {
        let buf = self.inner.read_buffer();
        buf.len() >= 4
            && buf.len() - 4 >= u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
    }
}
