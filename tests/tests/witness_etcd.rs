//! The etcd witness backend against a real three-member etcd 3.4 cluster
//! (Debian's etcd-server), each member in its own network namespace, TLS
//! with client certificates: racing claims, a member killed, the leader
//! partitioned, two members down, a stranger's certificate, etcd's RBAC
//! confining a node to its cluster, and the operator's
//! `ftvm-witness claim|status`.
//!
//! Nothing here bounds wall-clock time: timeouts only catch hangs, and a
//! claim that gets no answer is asked again, as a node would.

use ftvm_config::witness::WitnessClientConfig;
use ftvm_tests::etcd_lab::{self, EtcdLab, CLUSTER, MEMBERS};
use ftvm_witness::etcd::epoch_key;
use ftvm_witness::{ClaimOutcome, ClientError, WitnessBackend};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A bound that only catches a hang (elections on a loaded machine included).
const HANG: Duration = Duration::from_secs(180);
const ALL: [usize; MEMBERS] = [0, 1, 2];

fn lab(test: &str) -> Option<(tempfile::TempDir, EtcdLab)> {
    if !etcd_lab::available(test) {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = EtcdLab::start(dir.path()).unwrap();
    Some((dir, lab))
}

fn client(cfg: &WitnessClientConfig) -> Box<dyn WitnessBackend> {
    ftvm_witness::from_config(cfg).unwrap()
}

/// Claims until an answer comes (a node asks again after "no answer"); any
/// other error fails the test.
async fn claim_until_answer(c: &dyn WitnessBackend, epoch_seen: u64) -> ClaimOutcome {
    let start = Instant::now();
    loop {
        match c.claim(epoch_seen).await {
            Ok(outcome) => return outcome,
            Err(e @ ClientError::NoAnswer { .. }) => {
                assert!(
                    start.elapsed() < HANG,
                    "claim on {epoch_seen} got no answer for {HANG:?}: {e}"
                );
            }
            Err(e) => panic!("claim on {epoch_seen}: {e}"),
        }
    }
}

/// What each node was told, by epoch: the grants and the holders named in denials.
#[derive(Debug, Default)]
struct Answers {
    granted: BTreeMap<u64, String>,
    told_holder: Vec<(u64, String)>,
}

impl Answers {
    fn record(&mut self, node: &str, outcome: &ClaimOutcome) {
        match outcome {
            ClaimOutcome::Granted { epoch } => {
                let prev = self.granted.insert(*epoch, node.to_string());
                assert!(
                    prev.is_none() || prev.as_deref() == Some(node),
                    "epoch {epoch} granted to {prev:?} and to {node}"
                );
            }
            ClaimOutcome::Denied { holder, epoch } => {
                let holder = holder
                    .clone()
                    .expect("a denial after a grant names the holder");
                self.told_holder.push((*epoch, holder));
            }
        }
    }

    /// Checks the key's whole history: one write per epoch (1, 2, ... in
    /// order), every grant and every holder named in a denial as written.
    async fn check_against(&self, lab: &EtcdLab, reach: &[usize]) -> u64 {
        let mut raw = lab.raw_client(reach).await.unwrap();
        let key = epoch_key(ftvm_config::witness::DEFAULT_ETCD_KEY_PREFIX, CLUSTER);
        let hist = etcd_lab::history(&mut raw, &key).await.unwrap();
        for (i, (epoch, _)) in hist.iter().enumerate() {
            assert_eq!(
                *epoch,
                i as u64 + 1,
                "history is not one write per epoch: {hist:?}"
            );
        }
        let written: BTreeMap<u64, String> = hist.into_iter().collect();
        for (epoch, node) in &self.granted {
            assert_eq!(
                written.get(epoch),
                Some(node),
                "grant of {epoch} not as written"
            );
        }
        for (epoch, holder) in &self.told_holder {
            assert_eq!(
                written.get(epoch),
                Some(holder),
                "denial named the wrong holder of {epoch}"
            );
        }
        written.len() as u64
    }
}

/// Both nodes claim `epoch_seen` at once; exactly one is granted
/// `epoch_seen + 1` and the other is told it holds it. Returns the winner.
async fn race(
    a: &dyn WitnessBackend,
    b: &dyn WitnessBackend,
    epoch_seen: u64,
    answers: &mut Answers,
) -> &'static str {
    let (ra, rb) = tokio::join!(
        claim_until_answer(a, epoch_seen),
        claim_until_answer(b, epoch_seen)
    );
    answers.record("node-a", &ra);
    answers.record("node-b", &rb);
    let next = epoch_seen + 1;
    match (&ra, &rb) {
        (ClaimOutcome::Granted { epoch: e }, ClaimOutcome::Denied { holder, epoch: d })
            if (*e, *d, holder.as_deref()) == (next, next, Some("node-a")) =>
        {
            "node-a"
        }
        (ClaimOutcome::Denied { holder, epoch: d }, ClaimOutcome::Granted { epoch: e })
            if (*e, *d, holder.as_deref()) == (next, next, Some("node-b")) =>
        {
            "node-b"
        }
        _ => panic!("claims on {epoch_seen}: not one grant with the loser told: {ra:?} {rb:?}"),
    }
}

#[test]
fn etcd_1000_racing_claims_one_grant_per_epoch_loser_told() {
    let Some((_dir, lab)) = lab("etcd_1000_racing_claims_one_grant_per_epoch_loser_told") else {
        return;
    };
    lab.clients
        .block_on(|| async {
            let a = client(&lab.node_config("node-a", &ALL, 5, 5000).unwrap());
            let b = client(&lab.node_config("node-b", &ALL, 5, 5000).unwrap());
            let mut answers = Answers::default();
            let mut wins = BTreeMap::<&str, u32>::new();
            for epoch_seen in 0..1000 {
                *wins
                    .entry(race(&*a, &*b, epoch_seen, &mut answers).await)
                    .or_default() += 1;
            }
            // The winner asking again is granted again; a stale claim is denied.
            let last = answers.granted[&1000].clone();
            let (winner, loser) = if last == "node-a" { (&a, &b) } else { (&b, &a) };
            assert_eq!(
                winner.claim(999).await.unwrap(),
                ClaimOutcome::Granted { epoch: 1000 }
            );
            assert_eq!(
                loser.claim(10).await.unwrap(),
                ClaimOutcome::Denied {
                    holder: Some(last.clone()),
                    epoch: 1000
                }
            );
            let st = a.status().await.unwrap();
            assert_eq!(
                (st.epoch, st.holder.as_deref()),
                (1000, Some(last.as_str()))
            );
            assert_eq!(answers.check_against(&lab, &ALL).await, 1000);
            eprintln!("wins: {wins:?}");
        })
        .unwrap();
}

#[test]
fn etcd_member_killed_during_claims_keeps_granting_once_per_epoch() {
    let Some((_dir, mut lab)) =
        lab("etcd_member_killed_during_claims_keeps_granting_once_per_epoch")
    else {
        return;
    };
    let leader = lab.clients.block_on(|| lab.leader(HANG)).unwrap().unwrap();
    let pid = lab.members[leader].proc.as_ref().unwrap().pid();
    let answers = lab
        .clients
        .block_on(|| async {
            let a = client(&lab.node_config("node-a", &ALL, 5, 3000).unwrap());
            let b = client(&lab.node_config("node-b", &ALL, 5, 3000).unwrap());
            let mut answers = Answers::default();
            for epoch_seen in 0..150u64 {
                if epoch_seen == 50 {
                    // SIGKILL the leader while this round's claims are in flight.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(3)).await;
                        // SAFETY: signalling the etcd process this test started.
                        unsafe { libc::kill(pid, libc::SIGKILL) };
                    });
                }
                race(&*a, &*b, epoch_seen, &mut answers).await;
            }
            answers
        })
        .unwrap();
    assert!(!lab.member_running(leader), "the leader was not killed");
    lab.kill_member(leader);
    // The killed member comes back and agrees with the others.
    lab.start_member(leader).unwrap();
    lab.wait_ready(&[leader], HANG).unwrap();
    lab.clients
        .block_on(|| async {
            assert_eq!(answers.check_against(&lab, &[leader]).await, 150);
        })
        .unwrap();
}

#[test]
fn etcd_leader_partitioned_minority_answers_nothing_no_double_grant() {
    let Some((_dir, lab)) = lab("etcd_leader_partitioned_minority_answers_nothing_no_double_grant")
    else {
        return;
    };
    let leader = lab.clients.block_on(|| lab.leader(HANG)).unwrap().unwrap();
    let others: Vec<usize> = ALL.iter().copied().filter(|&i| i != leader).collect();
    lab.clients
        .block_on(|| async {
            // node-a reaches only the leader (it will be the minority side),
            // node-b only the two others.
            let a = client(&lab.node_config("node-a", &[leader], 2, 2000).unwrap());
            let b = client(&lab.node_config("node-b", &others, 5, 3000).unwrap());
            let mut answers = Answers::default();
            let mut epoch_seen = 0;
            while epoch_seen < 10 {
                race(&*a, &*b, epoch_seen, &mut answers).await;
                epoch_seen += 1;
            }
            let seen_by_a = epoch_seen;
            // Cut the leader off while a round's claims are in flight; that
            // round's claim from node-a may or may not be answered.
            let cut = async {
                tokio::time::sleep(Duration::from_millis(3)).await;
                tokio::task::block_in_place(|| lab.partition(leader))
            };
            let (ra, rb, cut) = tokio::join!(
                a.claim(epoch_seen),
                claim_until_answer(&*b, epoch_seen),
                cut
            );
            cut.unwrap();
            if let Ok(ra) = &ra {
                answers.record("node-a", ra);
            }
            answers.record("node-b", &rb);
            epoch_seen += 1;
            // From now on the minority side answers nothing, and the majority
            // grants every epoch to the only node it hears.
            for _ in 0..5 {
                match a.claim(epoch_seen).await {
                    Err(ClientError::NoAnswer { .. }) => {}
                    other => {
                        panic!("the partitioned leader answered a claim on {epoch_seen}: {other:?}")
                    }
                }
                match a.status().await {
                    Err(ClientError::NoAnswer { .. }) => {}
                    other => panic!("the partitioned leader answered a read: {other:?}"),
                }
                let rb = claim_until_answer(&*b, epoch_seen).await;
                assert_eq!(
                    rb,
                    ClaimOutcome::Granted {
                        epoch: epoch_seen + 1
                    }
                );
                answers.record("node-b", &rb);
                epoch_seen += 1;
            }
            lab.heal().unwrap();
            // Healed: node-a, still at the epoch it knew, is told who holds the latest.
            let ra = claim_until_answer(&*a, seen_by_a).await;
            assert_eq!(
                ra,
                ClaimOutcome::Denied {
                    holder: Some("node-b".into()),
                    epoch: epoch_seen
                }
            );
            answers.record("node-a", &ra);
            assert_eq!(answers.check_against(&lab, &ALL).await, epoch_seen);
        })
        .unwrap();
}

#[test]
fn etcd_two_of_three_down_no_answer_then_claims_again_when_one_returns() {
    let Some((_dir, mut lab)) =
        lab("etcd_two_of_three_down_no_answer_then_claims_again_when_one_returns")
    else {
        return;
    };
    let a_cfg = lab.node_config("node-a", &ALL, 2, 2000).unwrap();
    let b_cfg = lab.node_config("node-b", &ALL, 2, 2000).unwrap();
    lab.clients
        .block_on(|| async {
            assert_eq!(
                claim_until_answer(&*client(&a_cfg), 0).await,
                ClaimOutcome::Granted { epoch: 1 }
            );
        })
        .unwrap();
    lab.kill_member(0);
    lab.kill_member(1);
    lab.clients
        .block_on(|| async {
            let b = client(&b_cfg);
            for _ in 0..3 {
                match b.claim(1).await {
                    Err(e @ ClientError::NoAnswer { .. }) => {
                        assert!(e.to_string().contains("not a grant"), "{e}")
                    }
                    other => panic!("one member of three answered a claim: {other:?}"),
                }
            }
            assert!(matches!(
                b.status().await,
                Err(ClientError::NoAnswer { .. })
            ));
        })
        .unwrap();
    lab.start_member(1).unwrap();
    lab.clients
        .block_on(|| async {
            let b = client(&b_cfg);
            assert_eq!(
                claim_until_answer(&*b, 1).await,
                ClaimOutcome::Granted { epoch: 2 }
            );
            let a = client(&a_cfg);
            assert_eq!(
                claim_until_answer(&*a, 1).await,
                ClaimOutcome::Denied {
                    holder: Some("node-b".into()),
                    epoch: 2
                }
            );
        })
        .unwrap();
}

#[test]
fn etcd_refuses_a_client_certificate_from_another_ca() {
    let Some((_dir, lab)) = lab("etcd_refuses_a_client_certificate_from_another_ca") else {
        return;
    };
    // node-a's name, signed by another CA (trusting ours, so only etcd's
    // check of the client certificate can fail).
    let stranger_file = lab.node_file("node-a", "other-pki", &ALL, 2, 2000).unwrap();
    let stranger_cfg = WitnessClientConfig::load(&stranger_file).unwrap();
    lab.clients
        .block_on(|| async {
            let stranger = client(&stranger_cfg);
            let err = stranger.claim(0).await.unwrap_err();
            eprintln!("stranger: {err}");
            assert!(matches!(err, ClientError::NoAnswer { .. }), "{err}");
            // Nothing changed; a member's claim is the first grant.
            let a = client(&lab.node_config("node-a", &ALL, 5, 5000).unwrap());
            let st = a.status().await.unwrap();
            assert_eq!((st.epoch, st.holder), (0, None));
            assert_eq!(
                claim_until_answer(&*a, 0).await,
                ClaimOutcome::Granted { epoch: 1 }
            );
        })
        .unwrap();
    // The members themselves refused the certificate at the TLS handshake.
    let logs = lab.logs();
    assert!(
        logs.contains("certificate signed by unknown authority"),
        "no member logged the refused certificate"
    );
}

/// Runs etcdctl (v3 API) in the clients' namespace as `identity` (a
/// certificate of the lab's PKI); returns (success, stdout + stderr).
fn etcdctl(lab: &EtcdLab, identity: &str, args: &[&str]) -> (bool, String) {
    let p = lab.dir.join("pki");
    let out = lab
        .clients
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", lab.members[0].endpoint()))
        .arg(format!("--cacert={}", p.join("ca.pem").display()))
        .arg(format!(
            "--cert={}",
            p.join(format!("{identity}.pem")).display()
        ))
        .arg(format!(
            "--key={}",
            p.join(format!("{identity}.key")).display()
        ))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn etcd_rbac_confines_a_node_to_its_clusters_keys() {
    let test = "etcd_rbac_confines_a_node_to_its_clusters_keys";
    if !ftvm_tests::site::tool_available(test, "etcdctl", "etcd-client") {
        return;
    }
    let Some((_dir, lab)) = lab(test) else {
        return;
    };
    // As docs/witness.md says: with --client-cert-auth, etcd takes the
    // certificate's common name as the user; node-a may read and write the
    // keys of cluster prod only, node-b has no user at all.
    ftvm_transport::pki::issue_node(&lab.dir.join("pki"), "root").unwrap();
    for args in [
        &["user", "add", "root:root-password"][..],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "prod-nodes"],
        &[
            "role",
            "grant-permission",
            "prod-nodes",
            "--prefix=true",
            "readwrite",
            "/ftvm/witness/prod/",
        ],
        &["user", "add", "node-a:unused-password"],
        &["user", "grant-role", "node-a", "prod-nodes"],
        &["auth", "enable"],
    ] {
        let (ok, out) = etcdctl(&lab, "operator", args);
        assert!(ok, "etcdctl {args:?}: {out}");
    }
    lab.clients
        .block_on(|| async {
            let a = client(&lab.node_config("node-a", &ALL, 3, 5000).unwrap());
            assert_eq!(
                claim_until_answer(&*a, 0).await,
                ClaimOutcome::Granted { epoch: 1 }
            );
            match a.claim_in("other", 0).await {
                Err(ClientError::Refused { code, reason }) => {
                    eprintln!("node-a on another cluster: {code:?} {reason}");
                    assert_eq!(code, ftvm_witness::proto::RefuseCode::NotAuthorized);
                }
                other => panic!("node-a claimed another cluster's epoch: {other:?}"),
            }
            let b = client(&lab.node_config("node-b", &ALL, 3, 5000).unwrap());
            match b.claim(0).await {
                Err(ClientError::Refused { code, reason }) => {
                    eprintln!("node-b without a user: {code:?} {reason}")
                }
                other => panic!("a node without an etcd user got {other:?}"),
            }
            let st = a.status().await.unwrap();
            assert_eq!((st.epoch, st.holder.as_deref()), (1, Some("node-a")));
        })
        .unwrap();
    let (ok, out) = etcdctl(&lab, "root", &["get", "--prefix", "/ftvm/witness/other/"]);
    assert!(
        ok && out.trim().is_empty(),
        "another cluster's key was written: {out}"
    );
}

#[test]
fn etcd_operator_claim_and_status_commands() {
    let test = "etcd_operator_claim_and_status_commands";
    if !ftvm_tests::site::tool_available(test, "etcdctl", "etcd-client") {
        return;
    }
    let Some((_dir, mut lab)) = lab(test) else {
        return;
    };
    let bin = ftvm_tests::bin("ftvm-witness");
    let clients = lab.clients.name.clone();
    let cli = |file: &std::path::Path, args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &clients])
            .arg(&bin)
            .args(args)
            .arg("--config")
            .arg(file)
            .env("RUST_LOG", "warn")
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let a = lab.node_file("node-a", "pki", &ALL, 3, 5000).unwrap();
    let b = lab.node_file("node-b", "pki", &ALL, 3, 5000).unwrap();
    let claim = ["claim", "--cluster", CLUSTER, "--epoch", "0"];
    let (code, out, err) = cli(&a, &claim);
    assert_eq!((code, out.as_str()), (0, "GRANTED epoch=1\n"), "{err}");
    let (code, out, err) = cli(&b, &claim);
    assert_eq!(
        (code, out.as_str()),
        (1, "DENIED holder=node-a epoch=1\n"),
        "{err}"
    );
    let (code, out, err) = cli(&a, &claim);
    assert_eq!(
        (code, out.as_str()),
        (0, "GRANTED epoch=1\n"),
        "idempotent: {err}"
    );
    let (code, out, err) = cli(&b, &["status"]);
    assert_eq!(
        (code, out.as_str()),
        (0, "cluster=prod epoch=1 holder=node-a\n"),
        "{err}"
    );

    // etcdctl sees the same record.
    let p = lab.dir.join("pki");
    let key = epoch_key(ftvm_config::witness::DEFAULT_ETCD_KEY_PREFIX, CLUSTER);
    let out = lab
        .clients
        .command("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", lab.members[0].endpoint()))
        .arg(format!("--cacert={}", p.join("ca.pem").display()))
        .arg(format!("--cert={}", p.join("operator.pem").display()))
        .arg(format!("--key={}", p.join("operator.key").display()))
        .args(["get", "--print-value-only", &key])
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "ftvm-witness/1 epoch=1 holder=node-a",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No etcd: no answer, nothing on stdout, exit 2.
    for i in 0..MEMBERS {
        lab.kill_member(i);
    }
    let (code, out, err) = cli(&b, &["claim", "--cluster", CLUSTER, "--epoch", "1"]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains("no answer") && err.contains("not a grant"),
        "{err}"
    );
}
