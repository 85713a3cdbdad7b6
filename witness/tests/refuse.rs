//! Strangers and bad input are refused with a clear reason and change
//! nothing; a flood of bad connections does not stop the service.

mod common;

use common::{Lab, WitnessProc, CLUSTER};
use ftvm_transport::frame::{encode_frame, read_frame_async};
use ftvm_transport::quic::{self, QuicOptions, TlsFiles, ALPN_WITNESS};
use ftvm_transport::{quinn, rustls};
use ftvm_witness::proto::{self, RefuseCode, Request, RequestBody, ResponseBody, KIND_REQUEST};
use ftvm_witness::{ClaimOutcome, ClientError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bounds that only catch a hang: never reached by a working witness, however
/// loaded the machine.
const HANG: Duration = Duration::from_secs(30);

/// Waits until the witness's log holds `needle` at least `count` times. The
/// witness logs every refusal itself, so this checks what it decided, not
/// which side of a failed handshake noticed first.
async fn wait_for_log(w: &WitnessProc, needle: &str, count: usize) {
    let start = Instant::now();
    loop {
        let log = w.log_text();
        if log.matches(needle).count() >= count {
            return;
        }
        assert!(
            start.elapsed() < HANG,
            "witness never logged {needle:?} {count} time(s):\n{log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn endpoint(cfg: quinn::ClientConfig) -> quinn::Endpoint {
    quic::client_endpoint("127.0.0.1:0".parse().unwrap(), cfg).unwrap()
}

fn identity_endpoint(tls: &TlsFiles) -> quinn::Endpoint {
    endpoint(quic::client_config(tls, &[ALPN_WITNESS], &QuicOptions::default()).unwrap())
}

/// A client that trusts the cluster CA but presents no certificate.
fn anonymous_endpoint(lab: &Lab) -> quinn::Endpoint {
    let mut roots = rustls::RootCertStore::empty();
    for c in quic::load_certs(&lab.path().join("pki/ca.pem")).unwrap() {
        roots.add(c).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN_WITNESS.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
    endpoint(quinn::ClientConfig::new(Arc::new(crypto)))
}

/// Connects, sends `bytes` on a fresh stream and returns the decoded answer,
/// or the reason the exchange failed (handshake error, connection close).
async fn exchange(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    bytes: &[u8],
) -> Result<ResponseBody, String> {
    let conn = quic::connect(ep, addr, "witness", HANG)
        .await
        .map_err(|e| e.to_string())?;
    let res = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // A write may fail once the witness has closed the connection.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let frame = tokio::time::timeout(HANG, read_frame_async(&mut recv, 65536))
            .await
            .map_err(|_| "timed out".to_string())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "stream ended without an answer".to_string())?;
        proto::decode_response(&frame.payload)
            .map(|r| r.body)
            .map_err(|e| e.to_string())
    }
    .await;
    let res = res.map_err(|e| match conn.close_reason() {
        Some(reason) => format!("{e} / {reason}"),
        None => e,
    });
    conn.close(0u32.into(), b"");
    res
}

fn request_bytes(version: u16, body: RequestBody) -> Vec<u8> {
    let payload = proto::encode(&Request { version, body }).unwrap();
    let mut out = Vec::new();
    encode_frame(KIND_REQUEST, &payload, 1 << 20, &mut out).unwrap();
    out
}

fn claim_bytes(cluster: &str) -> Vec<u8> {
    request_bytes(
        proto::PROTOCOL_VERSION,
        RequestBody::Claim {
            cluster: cluster.into(),
            epoch_seen: 0,
        },
    )
}

fn oversized() -> Vec<u8> {
    let mut out = Vec::new();
    encode_frame(KIND_REQUEST, &vec![0u8; 5000], 1 << 20, &mut out).unwrap();
    out
}

async fn all_epochs_zero(lab: &Lab, addr: SocketAddr) {
    let op = lab.client("operator", addr);
    let all = op.status_of(None).await.unwrap();
    assert_eq!(all.len(), 2);
    for c in all {
        assert_eq!(
            (c.epoch, c.holder.as_deref()),
            (0, None),
            "state changed: {c:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_and_bad_input_are_refused_with_a_reason_and_change_nothing() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let mut w = WitnessProc::start(&cfg);
    let addr = w.addr;
    let claim = claim_bytes(CLUSTER);

    // A certificate from another CA: the TLS handshake fails (unknown CA).
    // What the client reads depends on when the witness's alert reaches it
    // (during the handshake, or at its first stream); what matters is that it
    // got no answer and that the witness refused the certificate.
    let err = exchange(&identity_endpoint(&lab.foreign_tls()), addr, &claim)
        .await
        .unwrap_err();
    eprintln!("other CA: {err}");
    wait_for_log(&w, "UnknownIssuer", 1).await;

    // No client certificate: the handshake fails (certificate required).
    let err = exchange(&anonymous_endpoint(&lab), addr, &claim)
        .await
        .unwrap_err();
    eprintln!("no cert: {err}");
    wait_for_log(&w, "peer sent no certificates", 1).await;
    assert_eq!(
        w.log_text()
            .matches("connection refused at the TLS handshake")
            .count(),
        2
    );

    // A valid certificate whose node is not a member of the cluster.
    let stranger = lab.client("stranger", addr);
    match stranger.claim(0).await {
        Err(ClientError::Refused {
            code: RefuseCode::NotMember,
            reason,
        }) => {
            assert!(
                reason.contains("stranger") && reason.contains("not a member"),
                "{reason}"
            )
        }
        other => panic!("stranger: {other:?}"),
    }
    match stranger.status().await {
        Err(ClientError::Refused {
            code: RefuseCode::NotMember,
            ..
        }) => {}
        other => panic!("stranger status: {other:?}"),
    }

    // An unknown cluster.
    let a = lab.client("node-a", addr);
    match a.claim_in("nope", 0).await {
        Err(ClientError::Refused {
            code: RefuseCode::UnknownCluster,
            reason,
        }) => {
            assert!(reason.contains("nope"), "{reason}")
        }
        other => panic!("unknown cluster: {other:?}"),
    }
    // A member asking for every cluster is not an operator.
    match a.status_of(None).await {
        Err(ClientError::Refused {
            code: RefuseCode::NotAuthorized,
            ..
        }) => {}
        other => panic!("status of all: {other:?}"),
    }

    let ep = identity_endpoint(&lab.tls("node-a"));
    // Garbage bytes: the connection is closed, naming the bad frame. The
    // witness closes the connection before its side of the stream could end
    // cleanly, so the client always learns the reason.
    let err = exchange(&ep, addr, b"GET / HTTP/1.1\r\nHost: witness\r\n\r\n")
        .await
        .unwrap_err();
    eprintln!("garbage: {err}");
    assert!(err.contains("bad frame") && err.contains("magic"), "{err}");
    wait_for_log(&w, "closing connection: bad frame", 1).await;

    // A frame over the maximum size.
    let err = exchange(&ep, addr, &oversized()).await.unwrap_err();
    eprintln!("oversized: {err}");
    assert!(err.contains("over the maximum of 4096"), "{err}");
    wait_for_log(&w, "closing connection: bad frame", 2).await;

    // A valid frame whose payload is not a request.
    let mut junk = Vec::new();
    encode_frame(KIND_REQUEST, &[1, 0xff, 0xff, 0xff], 64, &mut junk).unwrap();
    match exchange(&ep, addr, &junk).await {
        Ok(ResponseBody::Refused {
            code: RefuseCode::BadRequest,
            ..
        }) => {}
        other => panic!("junk payload: {other:?}"),
    }

    // An unknown protocol version.
    let v99 = request_bytes(
        99,
        RequestBody::Claim {
            cluster: CLUSTER.into(),
            epoch_seen: 0,
        },
    );
    match exchange(&ep, addr, &v99).await {
        Ok(ResponseBody::Refused {
            code: RefuseCode::UnsupportedVersion,
            reason,
        }) => {
            assert!(reason.contains("99") && reason.contains('1'), "{reason}")
        }
        other => panic!("version 99: {other:?}"),
    }

    // Nothing changed, the witness is alive, and a member's claim still works.
    assert!(w.alive());
    all_epochs_zero(&lab, addr).await;
    assert_eq!(
        a.claim(0).await.unwrap(),
        ClaimOutcome::Granted { epoch: 1 }
    );
    let log = w.log_text();
    assert!(log.contains("refused"), "refusals not logged");
}

/// Good rounds the members play at least, flood or not.
const MIN_GOOD_ROUNDS: u64 = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_members_during_1000_bad_connections() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let mut w = WitnessProc::start(&cfg);
    let addr = w.addr;

    // The members race for each epoch while the flood runs, and go on until
    // it is over (and at least MIN_GOOD_ROUNDS rounds were played). Every
    // round must end with one grant and the loser told the winner: a member
    // is served throughout, however slowly a loaded machine runs it. The
    // clients' timeouts only catch a hang.
    let flood_over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let a = common::client_timeout(&lab.tls("node-a"), addr, 5, Duration::from_secs(10));
        let b = common::client_timeout(&lab.tls("node-b"), addr, 5, Duration::from_secs(10));
        let flood_over = flood_over.clone();
        tokio::spawn(async move {
            let mut epoch = 0u64;
            let mut during_flood = 0u64;
            while epoch < MIN_GOOD_ROUNDS || !flood_over.load(std::sync::atomic::Ordering::SeqCst) {
                let in_flood = !flood_over.load(std::sync::atomic::Ordering::SeqCst);
                let (ra, rb) = tokio::join!(a.claim(epoch), b.claim(epoch));
                let (ra, rb) = match (ra, rb) {
                    (Ok(ra), Ok(rb)) => (ra, rb),
                    other => panic!("round {epoch}: a member was not served: {other:?}"),
                };
                let next = epoch + 1;
                match (&ra, &rb) {
                    (
                        ClaimOutcome::Granted { epoch: e },
                        ClaimOutcome::Denied { holder, epoch: d },
                    ) if (*e, *d, holder.as_deref()) == (next, next, Some("node-a")) => "node-a",
                    (
                        ClaimOutcome::Denied { holder, epoch: d },
                        ClaimOutcome::Granted { epoch: e },
                    ) if (*e, *d, holder.as_deref()) == (next, next, Some("node-b")) => "node-b",
                    _ => panic!("round {epoch}: not one grant with the loser told: {ra:?} {rb:?}"),
                };
                epoch = next;
                during_flood += u64::from(in_flood);
            }
            (epoch, during_flood)
        })
    };

    let eps = Arc::new([
        identity_endpoint(&lab.foreign_tls()),
        anonymous_endpoint(&lab),
        identity_endpoint(&lab.tls("stranger")),
        identity_endpoint(&lab.tls("node-b")),
    ]);
    let garbage: Arc<Vec<Vec<u8>>> = Arc::new(vec![
        claim_bytes(CLUSTER),
        claim_bytes(CLUSTER),
        b"\x00\x01garbage that is not a frame".to_vec(),
        oversized(),
        request_bytes(7, RequestBody::Status { cluster: None }),
        claim_bytes("nope"),
    ]);
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sem = Arc::new(tokio::sync::Semaphore::new(24));
    let mut tasks = Vec::new();
    let started = Instant::now();
    for i in 0..1000usize {
        let kind = i % 6;
        if kind == 5 {
            // Not even QUIC: a junk datagram.
            udp.send_to(b"\xff\x00junk datagram", addr).await.unwrap();
            continue;
        }
        let permit = sem.clone().acquire_owned().await.unwrap();
        let eps = eps.clone();
        let garbage = garbage.clone();
        tasks.push(tokio::spawn(async move {
            let ep = &eps[kind.min(3)];
            let r = exchange(ep, addr, &garbage[kind]).await;
            drop(permit);
            match r {
                Ok(ResponseBody::Granted { .. }) => panic!("bad connection {i} was granted"),
                Ok(ResponseBody::Denied { .. }) => panic!("bad connection {i} got a decision"),
                _ => {}
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let flood = started.elapsed();
    flood_over.store(true, std::sync::atomic::Ordering::SeqCst);
    let (rounds, during_flood) = good.await.unwrap();
    eprintln!("1000 bad connections in {flood:?}; {rounds} good rounds, {during_flood} of them begun during the flood");
    assert!(w.alive(), "witness died");
    let st = lab.client("node-a", addr).status().await.unwrap();
    assert_eq!(
        (st.epoch, st.holder.is_some()),
        (rounds, true),
        "bad connections changed the epoch"
    );
    // Each epoch was granted to one member and to nobody else (a retried
    // claim may log its idempotent re-grant again, to the same member).
    let log = w.log_text();
    let mut granted: std::collections::BTreeMap<u64, std::collections::BTreeSet<String>> =
        Default::default();
    for line in log.lines().filter(|l| l.contains("outcome=\"granted\"")) {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|t| t.strip_prefix(name))
                .map(|v| v.trim_matches('"').to_string())
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        let epoch: u64 = field("epoch=").parse().unwrap();
        granted.entry(epoch).or_default().insert(field("node="));
    }
    assert_eq!(
        granted.keys().copied().collect::<Vec<_>>(),
        (1..=rounds).collect::<Vec<_>>()
    );
    for (epoch, nodes) in granted {
        assert!(
            nodes.len() == 1 && ["node-a", "node-b"].contains(&nodes.first().unwrap().as_str()),
            "epoch {epoch} granted to {nodes:?}"
        );
    }
}
