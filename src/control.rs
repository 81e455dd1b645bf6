//! The control client behind `rotor status` and `rotor reload`.

use std::path::Path;
use std::time::Duration;

use rotor_protocol::{
    client_handshake, Channel, ClientChannel, ClientFrame, Envelope, Hello, Request, Response,
    Role, ServerFrame,
};
use tokio::net::UnixStream;

/// Returns once an allocator answers a handshake at `socket`: a starting
/// one answers once its first pool load is done (it binds its socket
/// before, so a connection alone says only that it runs). Each try waits
/// up to `each`; a refused or dropped one is tried again 20 ms later.
pub async fn answering(socket: &Path, each: Duration) {
    loop {
        if let Ok(Ok(_)) = tokio::time::timeout(each, greeted(socket)).await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A connection to the allocator at `socket`, greeted: the channel and
/// the allocator's Hello, or why not (said as what it likely is).
async fn greeted(socket: &Path) -> anyhow::Result<(ClientChannel<UnixStream>, Hello)> {
    let stream = match UnixStream::connect(socket).await {
        Ok(s) => s,
        // The socket is there, but this user may not reach it: the
        // socket file's mode, or its directory's.
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            return Err(anyhow::Error::new(e).context(format!(
                "this user may not connect to the allocator's socket {} (it takes write permission on the socket file and search permission on its directory: run as root or the allocator's user, or see --allow-uid, --allow-gid and --socket-mode)",
                socket.display()
            )))
        }
        Err(e) => {
            use std::io::ErrorKind;
            // Said as what it likely is: no socket there; one left by an
            // allocator that stopped (killed, or crashed and about to be
            // restarted by `rotor up`); one whose queue is full.
            // (A path that holds no socket at all, a configuration file
            // given as --socket, is refused so too: said as what it holds,
            // not as a socket to remove.)
            let not_a_socket = rotor_allocator::not_a_socket(socket);
            let why = match (e.kind(), not_a_socket) {
                (ErrorKind::ConnectionRefused, Some(what)) => format!("it is not a socket but {what}: is --socket (or ROTOR_SOCKET, or the configuration's socket) the path meant?"),
                (ErrorKind::ConnectionRefused, None) => "the socket file is there but nothing listens on it: the allocator stopped without removing it (under `rotor up`, a crashed one is restarted within seconds: see its log), or start it with `rotor up`".to_string(),
                (ErrorKind::WouldBlock, _) => "its queue of connections is full: it is stopped or overloaded".to_string(),
                _ => "is rotor running? start it with `rotor up`, or name its socket with --socket or ROTOR_SOCKET".to_string(),
            };
            return Err(anyhow::Error::new(e).context(format!(
                "no allocator answers at {} ({why})",
                socket.display()
            )));
        }
    };
    let mut chan: ClientChannel<UnixStream> = Channel::new(stream);
    let server = client_handshake(
        &mut chan,
        Hello::new(Role::Control, rotor_protocol::software("rotor")),
    )
    .await
    .map_err(|e| {
        // The allocator closes a connection from a user it does not
        // serve without a word: said here, not as a bare reset.
        let cut = match &e {
            rotor_protocol::HandshakeError::Closed => true,
            rotor_protocol::HandshakeError::Channel(rotor_protocol::ChannelError::Io(io)) => {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset
                        | std::io::ErrorKind::BrokenPipe
                        | std::io::ErrorKind::UnexpectedEof
                )
            }
            _ => false,
        };
        // It also closes one past its `--max-peers` unanswered, once more
        // are refused at once than it tells: root is always served, so
        // that is root's only cause.
        let why = match nix::unistd::geteuid().is_root() {
            true => "it holds as many connections as it takes (--max-peers): try again in a moment",
            false => "it serves root, its own user and those of its --allow-uid and --allow-gid (is this user one of them?), or it holds as many connections as it takes (--max-peers)",
        };
        match cut {
            true => anyhow::Error::new(e).context(format!(
                "the allocator at {} closed the connection before answering: {why}",
                socket.display()
            )),
            false => anyhow::Error::new(e),
        }
    })?;
    Ok((chan, server))
}

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
    let (mut chan, server) = tokio::time::timeout(ANSWER_WAIT, greeted(socket))
        .await
        .with_context(|| {
            format!(
                "the allocator did not answer within {} (a starting allocator answers once its first pool load is done, which a slow --pool-command or metadata service delays)",
                humantime::format_duration(ANSWER_WAIT)
            )
        })??;
    let body = choose(server.minor);
    // A reload is answered once its refresh is done: every source read,
    // each within its own timeout (a pool command's, the metadata
    // service's), and perhaps after a refresh under way.
    let wait = match body {
        Request::Reload | Request::ReloadReport | Request::ReloadReportV2 => RELOAD_WAIT,
        _ => ANSWER_WAIT,
    };
    let exchange = async {
        chan.send(&ClientFrame::Request(Envelope { id: 1, body }))
            .await?;
        match chan.recv().await? {
            Some(ServerFrame::Response(env)) => Ok(env.body),
            Some(other) => anyhow::bail!("unexpected frame from the allocator: {other:?}"),
            None => anyhow::bail!("the allocator closed the connection"),
        }
    };
    let reload = wait == RELOAD_WAIT;
    tokio::time::timeout(wait, exchange)
        .await
        .with_context(|| {
            format!(
                "the allocator did not answer within {}{}",
                humantime::format_duration(wait),
                if reload {
                    " (the reload goes on in the allocator; `rotor status` shows the pool once it is done)"
                } else {
                    ""
                }
            )
        })?
}

/// How long an answer is waited for; a reload's, longer.
const ANSWER_WAIT: Duration = Duration::from_secs(10);
const RELOAD_WAIT: Duration = Duration::from_secs(120);
