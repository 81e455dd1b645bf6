//! Arbitrary bytes from a SOCKS5 client, with and without a users file:
//! the handshake ends (a request or a clean error), never a panic or a
//! wait once the client has said all it will.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncWriteExt;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for auth in [false, true] {
        rt.block_on(async {
            let (mut client, mut server) = tokio::io::duplex(1 << 16);
            client.write_all(data).await.unwrap();
            client.shutdown().await.unwrap();
            let _ = rotor_worker::socks::handshake(&mut server, auth).await;
        });
    }
});
