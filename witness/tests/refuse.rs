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
    let conn = quic::connect(ep, addr, "witness", Duration::from_secs(5))
        .await
        .map_err(|e| e.to_string())?;
    let res = async {
        let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
        // A write may fail once the witness has closed the connection.
        let _ = send.write_all(bytes).await;
        let _ = send.finish();
        let frame =
            tokio::time::timeout(Duration::from_secs(5), read_frame_async(&mut recv, 65536))
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
    let err = exchange(&identity_endpoint(&lab.foreign_tls()), addr, &claim)
        .await
        .unwrap_err();
    eprintln!("other CA: {err}");
    assert!(
        err.contains("invalid peer certificate: UnknownIssuer"),
        "{err}"
    );

    // No client certificate: the handshake fails (certificate required).
    let err = exchange(&anonymous_endpoint(&lab), addr, &claim)
        .await
        .unwrap_err();
    eprintln!("no cert: {err}");
    assert!(err.contains("peer sent no certificates"), "{err}");

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
    // Garbage bytes: the connection is closed, naming the bad frame.
    let err = exchange(&ep, addr, b"GET / HTTP/1.1\r\nHost: witness\r\n\r\n")
        .await
        .unwrap_err();
    eprintln!("garbage: {err}");
    assert!(err.contains("bad frame") && err.contains("magic"), "{err}");

    // A frame over the maximum size.
    let err = exchange(&ep, addr, &oversized()).await.unwrap_err();
    eprintln!("oversized: {err}");
    assert!(err.contains("over the maximum of 4096"), "{err}");

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_serving_members_during_1000_bad_connections() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let mut w = WitnessProc::start(&cfg);
    let addr = w.addr;

    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let good = {
        let a = lab.client("node-a", addr);
        let b = lab.client("node-b", addr);
        let done = done.clone();
        tokio::spawn(async move {
            let mut epoch = 0u64;
            let mut worst = Duration::ZERO;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                let (ra, rb) = tokio::join!(a.claim(epoch), b.claim(epoch));
                worst = worst.max(t.elapsed());
                let grants = [ra.unwrap(), rb.unwrap()]
                    .iter()
                    .filter(|r| matches!(r, ClaimOutcome::Granted { .. }))
                    .count();
                assert_eq!(grants, 1, "round {epoch}");
                epoch += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (epoch, worst)
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
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let (rounds, worst) = good.await.unwrap();
    eprintln!("1000 bad connections in {flood:?}; {rounds} good rounds meanwhile, worst {worst:?}");
    assert!(w.alive(), "witness died");
    assert!(rounds >= 10, "only {rounds} good rounds during the flood");
    assert!(
        worst < Duration::from_secs(3),
        "a good claim took {worst:?}"
    );
    let st = lab.client("node-a", addr).status().await.unwrap();
    assert_eq!(st.epoch, rounds, "bad connections changed the epoch");
}
