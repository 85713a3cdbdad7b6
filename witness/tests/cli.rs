//! The operator's commands, run with the example configs and a fresh dev PKI.

mod common;

use common::{run_cli, WitnessProc};
use ftvm_config::witness::{WitnessClientConfig, WitnessConfig};
use ftvm_transport::pki;
use std::path::{Path, PathBuf};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples")
}

/// Copies the example configs into a temp dir with certificates from the dev PKI.
fn lab() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("pki");
    pki::run_certs(&pki::CertsCommand::Init { dir: p.clone() }).unwrap();
    for n in ["witness", "node-a", "node-b", "operator"] {
        pki::run_certs(&pki::CertsCommand::Issue {
            dir: p.clone(),
            node: n.to_string(),
            ips: Vec::new(),
        })
        .unwrap();
    }
    for f in ["witness.toml", "witness-node-a.toml", "witness-node-b.toml"] {
        let text = std::fs::read_to_string(examples().join(f)).unwrap();
        std::fs::write(dir.path().join(f), text).unwrap();
    }
    dir
}

fn set_port(file: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    assert!(text.contains(from), "{} lacks {from}", file.display());
    std::fs::write(file, text.replace(from, to)).unwrap();
}

#[test]
fn example_configs_load() {
    let w = WitnessConfig::load(&examples().join("witness.toml")).unwrap();
    assert_eq!(w.clusters[0].members, ["node-a", "node-b"]);
    assert!(w.control.is_some());
    for n in ["a", "b"] {
        let c =
            WitnessClientConfig::load(&examples().join(format!("witness-node-{n}.toml"))).unwrap();
        assert_eq!(c.cluster.as_deref(), Some("prod"));
        assert!(c.cert.ends_with(format!("pki/node-{n}.pem")));
        let e = WitnessClientConfig::load(&examples().join(format!("witness-etcd-node-{n}.toml")))
            .unwrap();
        assert_eq!(e.kind, ftvm_config::witness::WitnessKind::Etcd);
        assert_eq!((e.endpoints.len(), e.cluster.as_deref()), (3, Some("prod")));
    }
}

#[test]
fn claim_and_status_commands_print_the_documented_lines() {
    let dir = lab();
    let wcfg = dir.path().join("witness.toml");
    set_port(
        &wcfg,
        "listen = \"127.0.0.1:7470\"",
        "listen = \"127.0.0.1:0\"",
    );
    let mut w = WitnessProc::start(&wcfg);
    let addr = w.addr.to_string();
    for f in ["witness.toml", "witness-node-a.toml", "witness-node-b.toml"] {
        set_port(&dir.path().join(f), "127.0.0.1:7470", &addr);
    }
    let a = dir.path().join("witness-node-a.toml");
    let b = dir.path().join("witness-node-b.toml");
    let s = |p: &Path| p.to_str().unwrap().to_string();

    let (code, out, err) = run_cli(&[
        "claim",
        "--config",
        &s(&a),
        "--cluster",
        "prod",
        "--epoch",
        "0",
    ]);
    assert_eq!((code, out.as_str()), (0, "GRANTED epoch=1\n"), "{err}");
    let (code, out, err) = run_cli(&[
        "claim",
        "--config",
        &s(&b),
        "--cluster",
        "prod",
        "--epoch",
        "0",
    ]);
    assert_eq!(
        (code, out.as_str()),
        (1, "DENIED holder=node-a epoch=1\n"),
        "{err}"
    );
    // Idempotent for the winner.
    let (code, out, _) = run_cli(&[
        "claim",
        "--config",
        &s(&a),
        "--cluster",
        "prod",
        "--epoch",
        "0",
    ]);
    assert_eq!((code, out.as_str()), (0, "GRANTED epoch=1\n"));
    // Unknown cluster: refused, nothing printed on stdout.
    let (code, out, err) = run_cli(&[
        "claim",
        "--config",
        &s(&a),
        "--cluster",
        "nope",
        "--epoch",
        "1",
    ]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(err.contains("unknown cluster"), "{err}");

    // Status over QUIC (the [control] identity) while the witness runs.
    let (code, out, err) = run_cli(&["status", "--config", &s(&wcfg)]);
    assert_eq!(
        (code, out.as_str()),
        (0, "cluster=prod epoch=1 holder=node-a\n"),
        "{err}"
    );
    // A node file works for status too (the file's cluster, as that node).
    let (code, out, err) = run_cli(&["status", "--config", &s(&b)]);
    assert_eq!(
        (code, out.as_str()),
        (0, "cluster=prod epoch=1 holder=node-a\n"),
        "{err}"
    );
    // Without [control], status cannot read the database the server holds, and says so.
    let plain = dir.path().join("plain.toml");
    let text = std::fs::read_to_string(&wcfg).unwrap();
    std::fs::write(&plain, text.split("[control]").next().unwrap()).unwrap();
    let (code, _, err) = run_cli(&["status", "--config", &s(&plain)]);
    assert_eq!(code, 2);
    assert!(
        err.contains("locked") && err.contains("witness.db"),
        "{err}"
    );

    w.kill();
    // Stopped: status reads the database (control gets no answer, then falls back).
    let (code, out, err) = run_cli(&["status", "--config", &s(&plain)]);
    assert_eq!(
        (code, out.as_str()),
        (0, "cluster=prod epoch=1 holder=node-a\n"),
        "{err}"
    );
    // And a claim with no witness is "no answer", never GRANTED (short
    // timeouts to keep the test fast).
    set_port(&b, "attempts = 3", "attempts = 2");
    set_port(&b, "connect_timeout_ms = 2000", "connect_timeout_ms = 300");
    let (code, out, err) = run_cli(&[
        "claim",
        "--config",
        &s(&b),
        "--cluster",
        "prod",
        "--epoch",
        "1",
    ]);
    assert_eq!((code, out.as_str()), (2, ""));
    assert!(
        err.contains("no answer") && err.contains("not a grant"),
        "{err}"
    );
}
