//! `rotor-bench floor`: the least a rotating HTTP/1.1 forward proxy can do,
//! as a yardstick for rotor and HAProxy on the same cores. Per request it
//! reads the client's head, drops its `Connection` field, sends the head
//! as it is (absolute-form; nginx takes it) over a kept-alive connection
//! from the next source address of the pool, reads the response (its
//! `Content-Length` only) and writes it back with the same system calls
//! rotor makes (a read and a write on each side). No rules, no names, no
//! allocator, no limits, no timeouts, no log; GET without a body only.
//! One thread per core, each with its own `SO_REUSEPORT` listener, its own
//! rotation and its own upstream connections, so nothing is shared.
//! Runs for the given time, then exits.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// The head of a request or response: at most this many bytes.
const HEAD: usize = 16 * 1024;

/// The buffer a connection starts with, each way (grown for a longer head
/// or body).
const START: usize = 4096;

/// One thread's rotation and its idle upstream connections per source.
struct Pool {
    sources: Vec<IpAddr>,
    next: usize,
    idle: Vec<Vec<TcpStream>>,
}

pub fn run(
    listen: SocketAddr,
    origin: SocketAddr,
    sources: Vec<IpAddr>,
    threads: usize,
    seconds: u64,
) -> anyhow::Result<()> {
    anyhow::ensure!(!sources.is_empty(), "an empty pool");
    let mut handles = Vec::new();
    for _ in 0..threads.max(1) {
        let sources = sources.clone();
        handles.push(std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let socket = TcpSocket::new_v4()?;
                socket.set_reuseport(true)?;
                socket.set_reuseaddr(true)?;
                socket.bind(listen)?;
                let listener = socket.listen(4096)?;
                let pool = Rc::new(RefCell::new(Pool {
                    idle: sources.iter().map(|_| Vec::new()).collect(),
                    sources,
                    next: 0,
                }));
                let accepting = async {
                    loop {
                        let (client, _) = listener.accept().await?;
                        client.set_nodelay(true)?;
                        let pool = pool.clone();
                        tokio::task::spawn_local(async move {
                            let _ = serve(client, origin, &pool).await;
                        });
                    }
                };
                tokio::select! {
                    r = accepting => r,
                    _ = tokio::time::sleep(Duration::from_secs(seconds)) => Ok(()),
                }
            })
        }));
    }
    for h in handles {
        h.join()
            .map_err(|_| anyhow::anyhow!("a floor thread panicked"))??;
    }
    Ok(())
}

async fn connect_from(source: IpAddr, origin: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    // As rotor binds: no port taken until connect (many sources).
    nix::sys::socket::setsockopt(
        &socket,
        nix::sys::socket::sockopt::IpBindAddressNoPort,
        &true,
    )
    .map_err(std::io::Error::from)?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(origin).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Where the head in `buf` ends (after its blank line).
fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// The head's lines but `Connection`, into `out`; the value of its
/// `Content-Length`, if any.
fn copy_head(head: &[u8], out: &mut Vec<u8>, close: bool) -> Option<usize> {
    let mut length = None;
    let body = &head[..head.len() - 2];
    for line in body.split_inclusive(|&b| b == b'\n') {
        let name_end = line.iter().position(|&b| b == b':').unwrap_or(0);
        let name = &line[..name_end];
        if name.eq_ignore_ascii_case(b"connection") {
            continue;
        }
        if name.eq_ignore_ascii_case(b"content-length") {
            length = std::str::from_utf8(&line[name_end + 1..])
                .ok()
                .and_then(|v| v.trim().parse().ok());
        }
        out.extend_from_slice(line);
    }
    if close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    length
}

/// Reads from `s` into `buf[*have..]` until a head is whole; its end.
async fn read_head(
    s: &mut TcpStream,
    buf: &mut Vec<u8>,
    have: &mut usize,
) -> anyhow::Result<Option<usize>> {
    loop {
        if let Some(end) = head_end(&buf[..*have]) {
            return Ok(Some(end));
        }
        if *have == buf.len() {
            anyhow::ensure!(buf.len() < HEAD, "head too large");
            buf.resize(buf.len() * 2, 0);
        }
        let n = s.read(&mut buf[*have..]).await?;
        if n == 0 {
            return Ok(None);
        }
        *have += n;
    }
}

async fn serve(
    mut client: TcpStream,
    origin: SocketAddr,
    pool: &RefCell<Pool>,
) -> anyhow::Result<()> {
    let mut req = vec![0u8; START];
    let mut have = 0;
    let mut resp = vec![0u8; START];
    let mut out = Vec::with_capacity(1024);
    loop {
        let Some(end) = read_head(&mut client, &mut req, &mut have).await? else {
            return Ok(());
        };
        out.clear();
        let head = &req[..end];
        let close = head
            .windows(17)
            .any(|w| w.eq_ignore_ascii_case(b"connection: close"));
        copy_head(head, &mut out, false);
        req.copy_within(end..have, 0);
        have -= end;

        let (i, source, idle) = {
            let mut p = pool.borrow_mut();
            let i = p.next;
            p.next = (i + 1) % p.sources.len();
            (i, p.sources[i], p.idle[i].pop())
        };
        // A kept connection the origin has closed meanwhile (its
        // keep-alive timeout) fails the first read: the request (a GET) is
        // sent again once on a new one, as rotor does.
        let reused = idle.is_some();
        let mut up = match idle {
            Some(up) => up,
            None => connect_from(source, origin).await.context("connect")?,
        };
        let mut got = 0;
        let sent = up.write_all(&out).await;
        let mut end = match sent {
            Ok(()) => read_head(&mut up, &mut resp, &mut got).await,
            Err(e) => Err(e.into()),
        };
        if reused && got == 0 && !matches!(end, Ok(Some(_))) {
            up = connect_from(source, origin).await.context("connect")?;
            up.write_all(&out).await?;
            end = read_head(&mut up, &mut resp, &mut got).await;
        }
        let end = end?.context("the origin closed")?;
        out.clear();
        let length = copy_head(&resp[..end], &mut out, close).context("no content-length")?;
        let whole = end + length;
        if resp.len() < whole {
            resp.resize(whole, 0);
        }
        while got < whole {
            let n = up.read(&mut resp[got..whole]).await?;
            anyhow::ensure!(n > 0, "the origin closed");
            got += n;
        }
        out.extend_from_slice(&resp[end..whole]);
        client.write_all(&out).await?;
        pool.borrow_mut().idle[i].push(up);
        if close {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_lose_connection_and_tell_the_length() {
        let mut out = Vec::new();
        let head = b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 12\r\n\r\n";
        assert_eq!(copy_head(head, &mut out, true), Some(12));
        assert_eq!(
            out,
            b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\nConnection: close\r\n\r\n"
        );
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nX"), Some(18));
    }
}
