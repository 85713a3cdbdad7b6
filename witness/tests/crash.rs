//! The witness killed with SIGKILL right after granting keeps the grant.

mod common;

use common::{Lab, WitnessProc};
use ftvm_witness::ClaimOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_right_after_grant_then_restart_keeps_the_grant() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let mut w = WitnessProc::start(&cfg);
    for epoch in 0..5u64 {
        // Alternate the winner so each restart checks a different holder.
        let (winner, loser) = if epoch % 2 == 0 {
            ("node-a", "node-b")
        } else {
            ("node-b", "node-a")
        };
        let win = lab.client(winner, w.addr);
        assert_eq!(
            win.claim(epoch).await.unwrap(),
            ClaimOutcome::Granted { epoch: epoch + 1 }
        );
        // SIGKILL as soon as the answer is in: no graceful flush can run.
        w.kill();
        drop(win);
        w = WitnessProc::start(&cfg);
        let lose = lab.client(loser, w.addr);
        assert_eq!(
            lose.claim(epoch).await.unwrap(),
            ClaimOutcome::Denied {
                holder: Some(winner.to_string()),
                epoch: epoch + 1
            },
            "after restart {epoch}: the grant was lost"
        );
        // The winner's repeated claim is still granted (idempotent), not a new epoch.
        let win = lab.client(winner, w.addr);
        assert_eq!(
            win.claim(epoch).await.unwrap(),
            ClaimOutcome::Granted { epoch: epoch + 1 }
        );
        let st = win.status().await.unwrap();
        assert_eq!((st.epoch, st.holder.as_deref()), (epoch + 1, Some(winner)));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reports_no_answer_not_a_grant_when_witness_is_gone() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let mut w = WitnessProc::start(&cfg);
    let addr = w.addr;
    w.kill();
    let c = common::client_timeout(
        &lab.tls("node-a"),
        addr,
        2,
        std::time::Duration::from_millis(500),
    );
    // Two attempts, each bounded by its timeout, then "no answer" (the
    // client returning at all is the check that the timeouts bound it).
    let err = c.claim(0).await.unwrap_err();
    assert!(
        matches!(err, ftvm_witness::ClientError::NoAnswer { attempts: 2, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("not a grant"), "{err}");
    // And nothing was granted: a restarted witness still has epoch 0.
    let w = WitnessProc::start(&cfg);
    let b = lab.client("node-b", w.addr);
    assert_eq!(
        b.claim(0).await.unwrap(),
        ClaimOutcome::Granted { epoch: 1 }
    );
}
