//! Arbitrary bytes never panic the decoder: every input is a message or a
//! clean error.

use proptest::prelude::*;
use rotor_protocol::*;
use tokio::io::AsyncWriteExt;

proptest! {
    #[test]
    fn decoding_arbitrary_payloads_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<ClientFrame>(&bytes);
        let _ = decode::<ServerFrame>(&bytes);
        let _ = decode_prefix::<ClientFrame>(&bytes);
    }

    #[test]
    fn valid_messages_round_trip(id in any::<u64>(), v4 in any::<bool>(), v6 in any::<bool>()) {
        let msg = ClientFrame::Request(Envelope { id, body: Request::Lease { families: Families { v4, v6 } } });
        prop_assert_eq!(decode::<ClientFrame>(&encode(&msg).unwrap()).unwrap(), msg);
    }

    #[test]
    fn arbitrary_streams_give_messages_or_clean_errors(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (mut a, b) = tokio::io::duplex(4096);
            let mut chan: ServerChannel<_> = Channel::new(b);
            a.write_all(&bytes).await.unwrap();
            drop(a);
            // Read until the stream ends or breaks; nothing may panic.
            for _ in 0..64 {
                match chan.recv().await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => break,
                }
            }
        });
    }
}
