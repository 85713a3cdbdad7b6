//! Two members race claims on the same epoch against a real witness process.

mod common;

use common::{Lab, WitnessProc, CLUSTER};
use ftvm_witness::ClaimOutcome;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_members_racing_1000_rounds_get_exactly_one_grant_per_epoch() {
    let lab = Lab::new();
    let cfg = lab.config("127.0.0.1:0", "");
    let w = WitnessProc::start(&cfg);
    let a = lab.client("node-a", w.addr);
    let b = lab.client("node-b", w.addr);
    let mut wins = [0u32; 2];
    for epoch in 0..1000u64 {
        let (ra, rb) = tokio::join!(a.claim(epoch), b.claim(epoch));
        let (ra, rb) = (ra.unwrap(), rb.unwrap());
        let next = epoch + 1;
        match (&ra, &rb) {
            (ClaimOutcome::Granted { epoch: e }, ClaimOutcome::Denied { holder, epoch: d }) => {
                assert_eq!((*e, *d), (next, next), "round {epoch}: {ra:?} {rb:?}");
                assert_eq!(
                    holder.as_deref(),
                    Some("node-a"),
                    "loser not told the winner"
                );
                wins[0] += 1;
            }
            (ClaimOutcome::Denied { holder, epoch: d }, ClaimOutcome::Granted { epoch: e }) => {
                assert_eq!((*e, *d), (next, next), "round {epoch}: {ra:?} {rb:?}");
                assert_eq!(
                    holder.as_deref(),
                    Some("node-b"),
                    "loser not told the winner"
                );
                wins[1] += 1;
            }
            _ => panic!("round {epoch}: not exactly one grant: {ra:?} {rb:?}"),
        }
        // The winner asking again is idempotent; the loser asking again is still denied.
        if epoch % 100 == 0 {
            let again_a = a.claim(epoch).await.unwrap();
            assert_eq!(
                again_a == ClaimOutcome::Granted { epoch: next },
                wins_last(&ra)
            );
        }
    }
    assert_eq!(wins[0] + wins[1], 1000);
    let st = a.status().await.unwrap();
    assert_eq!(st.name, CLUSTER);
    assert_eq!(st.epoch, 1000);
    // A stale claim is denied.
    let stale = b.claim(10).await.unwrap();
    assert!(
        matches!(stale, ClaimOutcome::Denied { epoch: 1000, .. }),
        "{stale:?}"
    );
    eprintln!("node-a won {} rounds, node-b {}", wins[0], wins[1]);
    // Every decision was logged with cluster, node, epoch and outcome.
    let log = w.log_text();
    assert!(
        log.contains("outcome=\"granted\"") || log.contains("outcome=granted"),
        "no decision in the log:\n{}",
        &log[..log.len().min(2000)]
    );
    assert!(log.contains("cluster=\"prod\"") || log.contains("cluster=prod"));
}

fn wins_last(r: &ClaimOutcome) -> bool {
    matches!(r, ClaimOutcome::Granted { .. })
}
