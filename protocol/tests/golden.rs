//! Golden bytes: every message's encoding is pinned, so a change that would
//! make an older peer misread a newer one fails here first. A failing case
//! means the wire format changed: append instead, or bump PROTOCOL_MAJOR.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use rotor_protocol::*;

fn hello() -> Hello {
    Hello {
        major: 1,
        minor: 0,
        role: Role::Worker,
        pid: 4242,
        software: "w".into(),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn check<T>(msg: T, golden: &str)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let bytes = encode(&msg).unwrap();
    assert_eq!(hex(&bytes), golden, "encoding of {msg:?} changed");
    let back: T = decode(&bytes).unwrap();
    assert_eq!(back, msg);
}

/// One site with one address, as `Sites` and `SitesV2` report it.
fn sites_report() -> SitesReport {
    SitesReport {
        total: 1,
        pairs: 1,
        max_entries: 1000,
        sites: vec![SiteStatus {
            site: "a.io".into(),
            limit: Some(SiteLimit {
                count: 60,
                period_ms: 60_000,
            }),
            idle_secs: 2,
            addrs: vec![PairStatus {
                ip: V4,
                used: 3,
                cooling_ms: Some(900),
                strikes: 1,
            }],
        }],
    }
}

const V4: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7));
const V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));

#[test]
fn golden_client_frames() {
    check(ClientFrame::Hello(hello()), "00010000fb92100177");
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Lease {
                families: Families {
                    v4: true,
                    v6: false,
                },
            },
        }),
        "0107000100",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 300,
            body: Request::Status,
        }),
        "01fb2c0101",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 1,
            body: Request::Reload,
        }),
        "010102",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 2,
            body: Request::Attach,
        }),
        "010203",
    );
    // Minor 2.
    check(
        ClientFrame::Request(Envelope {
            id: 3,
            body: Request::StatusV2,
        }),
        "010304",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 4,
            body: Request::Unusable {
                ip: V6,
                reason: "r".into(),
            },
        }),
        "0104050120010db80000000000000000000000010172",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 5,
            body: Request::Pool,
        }),
        "010506",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 6,
            body: Request::LeaseSession {
                families: Families::V4,
                key: "u\0s".into(),
                ttl_secs: 600,
                strict: true,
            },
        }),
        "010607010003750073fb580201",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::LeaseSite {
                families: Families::ANY,
                site: "a.io".into(),
            },
        }),
        "010708010104612e696f",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Pushback {
                ip: V4,
                site: "a.io".into(),
                status: 429,
                retry_after_secs: Some(30),
            },
        }),
        "01070900c000020704612e696ffbad01011e",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::SiteOk {
                ip: V6,
                site: "a.io".into(),
            },
        }),
        "01070a0120010db800000000000000000000000104612e696f",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Metrics(WorkerMetrics {
                boot: 42,
                seq: 1,
                connections_open: 3,
                tunnels_open: 1,
                listen: vec!["http 127.0.0.1:8080".into()],
                requests: 9,
                by_source: vec![SourceMetrics {
                    ip: V4,
                    responses: [0, 8, 0, 1, 0],
                    tunnels: 1,
                    connect_errors: 0,
                    bytes_to: 10,
                    bytes_from: 300,
                }],
                errors: vec![("dns_error".into(), 1)],
                request_seconds: Histogram {
                    counts: vec![1, 2],
                    sum_micros: 500,
                },
                connect_seconds: Histogram::default(),
                lease_wait_seconds: Histogram::default(),
            }),
        }),
        "01070c2a010301011368747470203132372e302e302e313a38303830090100c0000207000800010001000afb2c010109646e735f6572726f7201020102fbf40100000000",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Steer {
                ip: V4,
                release: false,
                for_secs: Some(60),
            },
        }),
        "01070d00c000020700013c",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::HostStatus,
        }),
        "01070e",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Sites { max: 200 },
        }),
        "01070bc8",
    );
    // Minor 6.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::ReloadReport,
        }),
        "01070f",
    );
    // Minor 7.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Reloads,
        }),
        "010710",
    );
    // Minor 8.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::LeaseSiteWait {
                families: Families::ANY,
                site: "a.io".into(),
                wait_ms: 2000,
            },
        }),
        "010711010104612e696ffbd007",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::CancelWait { id: 9 },
        }),
        "01071209",
    );
    // Minor 9.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::SitesV2 { max: 200 },
        }),
        "010713c8",
    );
    // Minor 10.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::LeaseSessionSite {
                families: Families::V4,
                key: "u\0s".into(),
                ttl_secs: 60,
                strict: true,
                site: "a.io".into(),
            },
        }),
        "0107140100037500733c0104612e696f",
    );
    // Minor 12.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::WorkerReloaded {
                asked: (3, 250),
                failed: vec![("f".into(), "e".into())],
            },
        }),
        "01071503fa0101660165",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::ReloadReportV2,
        }),
        "010716",
    );
    // Minor 13.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Unreached {
                by_source: vec![SourceUnreached {
                    ip: "10.0.0.4".parse().unwrap(),
                    failed: 9,
                    destinations: vec![300],
                }],
            },
        }),
        "01071701000a0000040901fb2c01",
    );
    // Minor 14.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::SiteUnreached {
                ip: "10.0.0.4".parse().unwrap(),
                site: "e.com".into(),
            },
        }),
        "010718000a00000405652e636f6d",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::SiteConnected {
                ip: "10.0.0.4".parse().unwrap(),
                site: "e.com".into(),
            },
        }),
        "010719000a00000405652e636f6d",
    );
    // Minor 17.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Until {
                deadline_us: 1_000_000,
                request: Box::new(Request::LeaseSite {
                    families: Families::V4,
                    site: "e.com".into(),
                }),
            },
        }),
        "01071afc40420f0008010005652e636f6d",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::SiteStarted {
                ip: "10.0.0.4".parse().unwrap(),
                site: "e.com".into(),
                leased_us: 1_000_000,
                started_us: 1_300_000,
            },
        }),
        "01071b000a00000405652e636f6dfc40420f00fc20d61300",
    );
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::Clock { now_us: 1_000_000 },
        }),
        "01071cfc40420f00",
    );
    // Minor 19: the keys of TLS session tickets.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::TicketKeys,
        }),
        "01071d",
    );
    // Minor 21: a report with counters by name.
    check(
        ClientFrame::Request(Envelope {
            id: 7,
            body: Request::MetricsV2 {
                metrics: WorkerMetrics {
                    boot: 42,
                    seq: 1,
                    ..WorkerMetrics::default()
                },
                counters: vec![("access_log_lost_lines".into(), 3)],
            },
        }),
        "01071e2a0100000000000000000000000001156163636573735f6c6f675f6c6f73745f6c696e657303",
    );
}

#[test]
fn golden_server_frames() {
    check(
        ServerFrame::Hello(HelloReply::Accepted(hello())),
        "0000010000fb92100177",
    );
    check(
        ServerFrame::Hello(HelloReply::Refused {
            reason: "no".into(),
            server: hello(),
        }),
        "0001026e6f010000fb92100177",
    );
    let resp = |body| ServerFrame::Response(Envelope { id: 9, body });
    check(
        resp(Response::Leased(Lease {
            ip: V4,
            seq: 1000,
            generation: 3,
        })),
        "01090000c0000207fbe80303",
    );
    check(
        resp(Response::Leased(Lease {
            ip: V6,
            seq: 1,
            generation: 1,
        })),
        "0109000120010db80000000000000000000000010101",
    );
    check(
        resp(Response::NoAddress(Refusal {
            reason: NoAddress::EmptyPool,
            generation: 2,
        })),
        "0109010002",
    );
    check(
        resp(Response::NoAddress(Refusal {
            reason: NoAddress::NoFamily {
                wanted: Families {
                    v4: false,
                    v6: true,
                },
            },
            generation: 2,
        })),
        "01090101000102",
    );
    check(
        resp(Response::Reloaded {
            generation: 4,
            size: 8,
        }),
        "0109030408",
    );
    check(
        resp(Response::Error {
            message: "x".into(),
        }),
        "0109040178",
    );
    check(
        resp(Response::Attached {
            path: "/t".into(),
            id: 258,
            slot: Some(3),
        }),
        "010905022f74fb02010103",
    );
    check(
        resp(Response::Status(StatusReport {
            generation: 2,
            cursor: 1,
            pool: vec![AddrStatus { ip: V4, leases: 5 }],
            leases_total: 5,
            last_refresh_unix: Some(1_700_000_000),
            sources: vec![SourceStatus {
                name: "--pool 192.0.2.7".into(),
                addresses: 1,
                error: None,
            }],
            peers: vec![PeerStatus {
                role: Role::Control,
                pid: 1,
                software: "c".into(),
                connected_secs: 2,
                leases: 0,
            }],
            uptime_secs: 60,
        })),
        "01090202010100c0000207050501fc00f1536501102d2d706f6f6c203139322e302e322e370100010101016302003c",
    );
    // Minor 2.
    check(resp(Response::Noted { quarantined: true }), "01090701");
    check(resp(Response::SessionLost { ip: V4 }), "01090900c0000207");
    check(
        resp(Response::Pool {
            generation: 3,
            entries: vec![Segment::single(V4), Segment::prefix(V6, 64).unwrap()],
        }),
        "010908030200c0000207000120010db800000000000000000000000040",
    );
    check(
        resp(Response::StatusV2(StatusReportV2 {
            generation: 2,
            sessions: 1,
            families: vec![FamilyStatus {
                family: Family::V6,
                cursor: 1,
                total: 1 << 44,
                next: Some(V6),
            }],
            pool: vec![
                EntryStatus {
                    entry: Segment::prefix(V6, 64).unwrap(),
                    leases: 5,
                    quarantine: None,
                },
                EntryStatus {
                    entry: Segment::single(V4),
                    leases: 0,
                    quarantine: Some(QuarantineStatus {
                        reason: "q".into(),
                        since_secs: 3,
                        retry_in_secs: 4,
                    }),
                },
            ],
            leases_total: 5,
            last_refresh_unix: None,
            sources: vec![],
            peers: vec![],
            uptime_secs: 60,
        })),
        "0109060201010101fd0000000000100000010120010db8000000000000000000000001020120010db800000000000000000000000040050000c000020700000101710304050000003c",
    );
    check(
        resp(Response::SiteLeased {
            lease: Lease {
                ip: V4,
                seq: 1000,
                generation: 3,
            },
            watch: true,
        }),
        "01090a00c0000207fbe8030301",
    );
    check(
        resp(Response::Throttled {
            retry_after_ms: 1500,
            cooling: false,
        }),
        "01090bfbdc0500",
    );
    check(
        resp(Response::Sites(sites_report())),
        "01090c0101fbe8030104612e696f013cfb60ea020100c00002070301fb840301",
    );
    check(
        resp(Response::HostStatus(HostReport {
            requests: 5,
            errors: vec![("dns_error".into(), 1)],
            workers: vec![WorkerStatus {
                pid: 7,
                listen: vec!["http 127.0.0.1:8080".into()],
                connections_open: 2,
                tunnels_open: 1,
                requests: 5,
            }],
        })),
        "01090e050109646e735f6572726f72010107011368747470203132372e302e302e313a38303830020105",
    );
    check(
        resp(Response::Steered {
            entry: Some(Segment::single(V4)),
        }),
        "01090d0100c000020700",
    );
    // Minor 5.
    check(
        resp(Response::SessionsFull {
            retry_after_ms: 1500,
        }),
        "01090ffbdc05",
    );
    // Minor 6.
    check(
        resp(Response::ReloadReport(ReloadReport {
            generation: 4,
            entries: 8,
            addresses: 300,
            failed: vec![("f".into(), "e".into())],
        })),
        "0109100408fb2c010101660165",
    );
    // Minor 7.
    check(
        resp(Response::Reloads {
            table: 3,
            count: 250,
        }),
        "01091103fa",
    );
    // Minor 9: the `Sites` report as above, and the prefix length.
    check(
        resp(Response::SitesV2(SitesReportV2 {
            report: sites_report(),
            v6_prefix: 64,
        })),
        "0109120101fbe8030104612e696f013cfb60ea020100c00002070301fb84030140",
    );
    // Minor 12: the reload's report as above, and each worker's.
    check(
        resp(Response::ReloadReportV2(ReloadReportV2 {
            report: ReloadReport {
                generation: 4,
                entries: 8,
                addresses: 300,
                failed: vec![("f".into(), "e".into())],
            },
            workers: vec![
                WorkerReload {
                    pid: 70,
                    outcome: WorkerReloadOutcome::Done {
                        failed: vec![("c".into(), "x".into())],
                    },
                },
                WorkerReload {
                    pid: 71,
                    outcome: WorkerReloadOutcome::NoWord,
                },
                WorkerReload {
                    pid: 72,
                    outcome: WorkerReloadOutcome::TooOld,
                },
            ],
            more_workers: 0,
        })),
        "0109130408fb2c01010166016503460001016301784701480200",
    );
    // Minor 16: a status too large for a frame, its entries in rotation
    // left out, and how many.
    check(
        resp(Response::StatusCut {
            report: StatusReportV2 {
                generation: 2,
                sessions: 0,
                families: vec![],
                pool: vec![],
                leases_total: 0,
                last_refresh_unix: None,
                sources: vec![],
                peers: vec![],
                uptime_secs: 1,
            },
            unlisted: 7,
        }),
        "01091402000000000000000107",
    );
    // Minor 19: the keys of TLS session tickets, the one to seal with
    // first.
    check(
        resp(Response::TicketKeys {
            keys: vec![TicketKey {
                name: [1; 16],
                key: [2; 32],
            }],
            next_secs: 60,
        }),
        "010915010101010101010101010101010101010102020202020202020202020202020202020202020202020202020202020202023c",
    );
    // Minor 20: a steer's answer, with why it is not kept.
    check(
        resp(Response::SteeredV2 {
            entry: Some(Segment::single(V4)),
            not_kept: Some("full".into()),
        }),
        "0109160100c000020700010466756c6c",
    );
    // Minor 21: a session's request held at the sessions' share.
    check(
        resp(Response::SessionShared {
            retry_after_ms: 1500,
        }),
        "010917fbdc05",
    );
}

/// An `Until` inside an `Until` does not decode, however deep the chain
/// (two bytes a level: one of a few thousand overflowed the reader's
/// stack), and the reader is not left refusing the next one.
#[test]
fn a_deadline_inside_a_deadline_does_not_decode() {
    let lease = Request::LeaseSite {
        families: Families::V4,
        site: "e.com".into(),
    };
    let until = |request| Request::Until {
        deadline_us: 9,
        request: Box::new(request),
    };
    let frame = |body| ClientFrame::Request(Envelope { id: 7, body });
    let nested = encode(&frame(until(until(lease.clone())))).unwrap();
    assert!(decode::<ClientFrame>(&nested).is_err());
    // A chain of a million levels, as bytes (the frame's limit allows two).
    let mut deep = vec![0x01, 0x07];
    for _ in 0..1_000_000 {
        deep.extend_from_slice(&[0x1a, 0x00]);
    }
    deep.extend_from_slice(&[0x00, 0x01, 0x00]);
    assert!(decode::<ClientFrame>(&deep).is_err());
    let one = encode(&frame(until(lease.clone()))).unwrap();
    assert_eq!(decode::<ClientFrame>(&one).unwrap(), frame(until(lease)));
}
