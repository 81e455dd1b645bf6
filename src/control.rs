//! The control client behind `rotor status` and `rotor reload`.

use std::path::Path;
use std::time::Duration;

use rotor_protocol::{
    client_handshake, Channel, ClientChannel, ClientFrame, Envelope, Hello, Request, Response,
    Role, ServerFrame,
};
use tokio::net::UnixStream;

/// Sends one request to the allocator and returns its answer.
pub async fn request(socket: &Path, body: Request) -> anyhow::Result<Response> {
    request_by_minor(socket, |_| body).await
}

/// Sends the request `choose` makes for the allocator's protocol minor
/// (an older allocator is asked what it knows) and returns its answer.
pub async fn request_by_minor(
    socket: &Path,
    choose: impl FnOnce(u16) -> Request,
) -> anyhow::Result<Response> {
    use anyhow::Context;
    let exchange = async {
        let stream = UnixStream::connect(socket)
            .await
            .with_context(|| {
                format!(
                    "no allocator answers at {} (is rotor running? start it with `rotor up`, or name its socket with --socket or ROTOR_SOCKET)",
                    socket.display()
                )
            })?;
        let mut chan: ClientChannel<UnixStream> = Channel::new(stream);
        let server = client_handshake(
            &mut chan,
            Hello::new(Role::Control, concat!("rotor/", env!("CARGO_PKG_VERSION"))),
        )
        .await?;
        let body = choose(server.minor);
        chan.send(&ClientFrame::Request(Envelope { id: 1, body }))
            .await?;
        match chan.recv().await? {
            Some(ServerFrame::Response(env)) => Ok(env.body),
            Some(other) => anyhow::bail!("unexpected frame from the allocator: {other:?}"),
            None => anyhow::bail!("the allocator closed the connection"),
        }
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .context("the allocator did not answer within 10s")?
}
