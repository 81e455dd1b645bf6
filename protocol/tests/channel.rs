//! The typed channel and the handshake over an in-memory pipe.

use rotor_protocol::*;
use tokio::io::AsyncWriteExt;

fn pair() -> (
    ClientChannel<tokio::io::DuplexStream>,
    ServerChannel<tokio::io::DuplexStream>,
) {
    let (a, b) = tokio::io::duplex(1 << 16);
    (Channel::new(a), Channel::new(b))
}

#[tokio::test]
async fn handshake_then_requests_round_trip() {
    let (mut client, mut server) = pair();
    let srv = tokio::spawn(async move {
        let theirs = server_handshake(&mut server, Hello::new(Role::Control, "alloc"))
            .await
            .unwrap();
        assert_eq!(theirs.role, Role::Worker);
        let req = server.recv().await.unwrap().unwrap();
        let ClientFrame::Request(env) = req else {
            panic!("expected a request, got {req:?}")
        };
        server
            .send(&ServerFrame::Response(Envelope {
                id: env.id,
                body: Response::Reloaded {
                    generation: 1,
                    size: 0,
                },
            }))
            .await
            .unwrap();
    });
    let server_hello = client_handshake(&mut client, Hello::new(Role::Worker, "w"))
        .await
        .unwrap();
    assert_eq!(server_hello.software, "alloc");
    client
        .send(&ClientFrame::Request(Envelope {
            id: 77,
            body: Request::Reload,
        }))
        .await
        .unwrap();
    match client.recv().await.unwrap().unwrap() {
        ServerFrame::Response(Envelope { id: 77, .. }) => {}
        other => panic!("unexpected {other:?}"),
    }
    srv.await.unwrap();
}

#[tokio::test]
async fn other_major_is_refused_with_a_reason() {
    let (mut client, mut server) = pair();
    let srv =
        tokio::spawn(
            async move { server_handshake(&mut server, Hello::new(Role::Control, "a")).await },
        );
    let mut hello = Hello::new(Role::Worker, "future");
    hello.major = PROTOCOL_MAJOR + 1;
    match client_handshake(&mut client, hello).await {
        Err(HandshakeError::Refused(reason)) => assert!(reason.contains("protocol"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(matches!(
        srv.await.unwrap(),
        Err(HandshakeError::VersionMismatch { .. })
    ));
}

#[tokio::test]
async fn oversized_frame_is_refused_before_allocation() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut server: ServerChannel<_> = Channel::new(b);
    let mut raw = a;
    raw.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    let err = server.recv().await.unwrap_err();
    assert!(err.is_protocol_violation(), "{err:?}");
}

#[tokio::test]
async fn garbage_payload_is_a_decode_error() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut server: ServerChannel<_> = Channel::new(b);
    let mut raw = a;
    raw.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff])
        .await
        .unwrap();
    let err = server.recv().await.unwrap_err();
    assert!(err.is_protocol_violation(), "{err:?}");
}

/// A peer that closes in the middle of a frame sent garbage, as far as
/// anyone can tell (the allocator says so at warn, not at debug).
#[tokio::test]
async fn a_close_in_the_middle_of_a_frame_is_a_protocol_violation() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let mut server: ServerChannel<_> = Channel::new(b);
    let mut raw = a;
    raw.write_all(&[0, 0, 0, 9, 1, 2]).await.unwrap();
    drop(raw);
    let err = server.recv().await.unwrap_err();
    assert!(err.is_protocol_violation(), "{err:?}");
}

#[test]
fn trailing_bytes_are_refused_outside_hello() {
    let mut bytes = encode(&ClientFrame::Request(Envelope {
        id: 1,
        body: Request::Status,
    }))
    .unwrap();
    bytes.push(0);
    assert!(matches!(
        decode::<ClientFrame>(&bytes),
        Err(CodecError::Trailing(1))
    ));
}

#[test]
fn families_of_addresses() {
    let v4: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let v6: std::net::IpAddr = "::1".parse().unwrap();
    assert_eq!(
        Families::of([v4]),
        Families {
            v4: true,
            v6: false
        }
    );
    assert_eq!(Families::of([v4, v6]), Families::ANY);
    assert!(!Families::of([v6]).accepts(&v4));
}

/// A frame begun and not ended is told apart from none, also once the
/// codec has taken its length out of the buffer, and a recv cancelled
/// while it waits loses nothing.
#[tokio::test]
async fn a_frame_begun_is_seen_as_begun_until_it_ends() {
    let (a, b) = tokio::io::duplex(1 << 16);
    let (_, mut rx) = Channel::<_, ClientFrame, ServerFrame>::new(b).split();
    let mut a = a;
    let frame = encode(&ServerFrame::Response(Envelope {
        id: 5,
        body: Response::Reloaded {
            generation: 1,
            size: 0,
        },
    }))
    .unwrap();
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&frame);
    let wait = std::time::Duration::from_millis(50);
    assert!(tokio::time::timeout(wait, rx.recv()).await.is_err());
    assert!(!rx.mid_frame(), "nothing sent yet");
    // Only the length: the codec consumes it and the buffer is empty.
    a.write_all(&wire[..4]).await.unwrap();
    assert!(tokio::time::timeout(wait, rx.recv()).await.is_err());
    assert!(rx.mid_frame(), "length read, body not");
    a.write_all(&wire[4..6]).await.unwrap();
    assert!(tokio::time::timeout(wait, rx.recv()).await.is_err());
    assert!(rx.mid_frame());
    a.write_all(&wire[6..]).await.unwrap();
    let got = rx.recv().await.unwrap().unwrap();
    assert!(matches!(got, ServerFrame::Response(Envelope { id: 5, .. })));
    assert!(!rx.mid_frame(), "the frame ended");
    // Part of a length only.
    a.write_all(&wire[..2]).await.unwrap();
    assert!(tokio::time::timeout(wait, rx.recv()).await.is_err());
    assert!(rx.mid_frame());
}

/// A peer that closes after a frame's length and nothing more closed in
/// the middle of a frame: an error, not a clean close between frames.
#[tokio::test]
async fn a_close_after_a_frames_length_is_an_error() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let (_, mut rx) = Channel::<_, ClientFrame, ServerFrame>::new(b).split();
    a.write_all(&16u32.to_be_bytes()).await.unwrap();
    drop(a);
    let got = rx.recv().await;
    assert!(got.is_err(), "{got:?}");
    // Nothing at all, then the close: a clean one.
    let (a, b) = tokio::io::duplex(1 << 16);
    let (_, mut rx) = Channel::<_, ClientFrame, ServerFrame>::new(b).split();
    drop(a);
    assert!(rx.recv().await.unwrap().is_none());
}

/// A frame read with part of the next behind it: that next one is begun.
#[tokio::test]
async fn part_of_the_next_frame_behind_one_is_begun() {
    let (mut a, b) = tokio::io::duplex(1 << 16);
    let (_, mut rx) = Channel::<_, ClientFrame, ServerFrame>::new(b).split();
    let frame = encode(&ServerFrame::Response(Envelope {
        id: 1,
        body: Response::Noted { quarantined: false },
    }))
    .unwrap();
    let mut wire = (frame.len() as u32).to_be_bytes().to_vec();
    wire.extend_from_slice(&frame);
    wire.extend_from_slice(&[0, 0]);
    a.write_all(&wire).await.unwrap();
    assert!(rx.recv().await.unwrap().is_some());
    assert!(rx.mid_frame());
}
