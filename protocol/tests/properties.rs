//! Arbitrary bytes never panic the decoder: every input is a message or a
//! clean error.

use proptest::prelude::*;
use rotor_protocol::*;
use tokio::io::AsyncWriteExt;

proptest! {
    /// Every lease of a prefix is found again where it was: `index_of`
    /// undoes `at` for any prefix length and position (so the walk is a
    /// bijection on each prefix, and resumable).
    #[test]
    fn prefix_leases_are_found_again(len in 0u8..=128, i in any::<u128>(), net in any::<u128>()) {
        let seg = Segment::prefix(std::net::Ipv6Addr::from(net).into(), len).unwrap();
        let i = if len == 0 { i } else { i % seg.len() };
        let ip = seg.at(i);
        prop_assert!(seg.contains(ip));
        prop_assert_eq!(seg.index_of(ip), Some(i));
    }

    #[test]
    fn tables_never_lease_outside_their_pool(v4 in proptest::collection::vec(any::<u32>(), 0..20), leases in 1usize..64) {
        let pool: Vec<Segment> = v4.iter().map(|a| Segment::single(std::net::Ipv4Addr::from(*a).into())).collect();
        let t = LeaseTable::anonymous(32, 0).unwrap();
        t.publish(&pool, &[], 1, |_, _, _| 0).unwrap();
        for _ in 0..leases {
            match t.lease(Families::ANY, None) {
                Some(Ok(l)) => prop_assert!(pool.iter().any(|s| s.contains(l.ip))),
                Some(Err(_)) => prop_assert!(pool.is_empty()),
                None => prop_assert!(false, "closed"),
            }
        }
    }

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
