//! Deploying ftvm with Ansible (ansible/, docs/deploy.md) as users run it:
//! real `ansible-playbook` over SSH to three lab hosts (`scripts/lab.sh up
//! --hosts`: sites A and B and the witness site, each a network namespace
//! with its own sshd and private /etc/ftvm, /var/lib/ftvm and /opt/ftvm),
//! then a rolling upgrade (`upgrade.yml`) under client load, then drills
//! from `drill.yml` through the lab's WAN relay.

use anyhow::{bail, ensure, Context, Result};
use ftvm_appliance::drill::load::{self, Load};
use ftvm_tests::lab::{last_lines, wait_until, Lab};
use ftvm_tests::{ansible, site};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// ftvmctl on a lab host.
const FTVMCTL: &str = "/opt/ftvm/sbin/ftvmctl";

/// The one-way WAN delay the lab's relay adds (the lab inventory's default).
const WAN_DELAY_MS: u64 = 20;

#[test]
fn ansible_lint_passes_on_the_playbooks_and_roles() {
    let Some(bin) = ansible::bin_dir("ansible_lint_passes_on_the_playbooks_and_roles") else {
        return;
    };
    // ansible/.ansible-lint: the production profile, offline.
    let (out, text) = ansible::run(ansible::command(&bin, "ansible-lint")).unwrap();
    assert!(out.status.success(), "ansible-lint found problems:\n{text}");
    assert!(text.contains("Passed"), "{text}");
}

#[test]
fn the_example_inventory_passes_validation_and_a_wrong_setting_is_named() {
    let Some(bin) =
        ansible::bin_dir("the_example_inventory_passes_validation_and_a_wrong_setting_is_named")
    else {
        return;
    };
    // Only the validation play runs, and it never connects to a host. Were
    // anything to try, it would find port 9 of this machine closed (the
    // example's hosts are not to be contacted) and the run would fail.
    let validate = |extra: &[&str]| {
        let mut c = ansible::command(&bin, "ansible-playbook");
        c.args([
            "-i",
            "inventories/example",
            "site.yml",
            "--tags",
            "validate",
        ])
        .args(["-e", "ansible_host=127.0.0.1", "-e", "ansible_port=9"])
        .args(extra);
        ansible::run(c).unwrap()
    };
    let (out, text) = validate(&[]);
    let recap = ansible::recap(&text);
    assert!(
        out.status.success()
            && recap.len() == 3
            && recap.values().all(|c| c.get("unreachable") == Some(&0)),
        "{text}"
    );
    for bad in [
        "ftvm_appliance_disk_reads=sometimes",
        "ftvm_service_manager=cron",
        "ftvm_appliance_failure_timeout_ms=soon",
    ] {
        let (out, text) = validate(&["-e", bad]);
        let (name, value) = bad.split_once('=').unwrap();
        assert!(
            !out.status.success()
                && text.contains("Validation of arguments failed")
                && text.contains(name)
                && text.contains(value),
            "{bad}:\n{text}"
        );
    }
}

#[test]
fn ansible_deploys_the_lab_pair_and_runs_drills() {
    let test = "ansible_deploys_the_lab_pair_and_runs_drills";
    if !(site::ftkv_ready(test)
        && site::tool_available(test, "/usr/sbin/sshd", "openssh-server")
        && site::tool_available(test, "socat", "socat")
        && site::tool_available(test, "systemd-analyze", "systemd"))
    {
        return;
    }
    let Some(bin) = ansible::bin_dir(test) else {
        return;
    };
    let lab = Lab::up_with_hosts(WAN_DELAY_MS).expect("the lab with hosts");
    if let Err(e) = deploy_and_drill(&lab, &bin) {
        panic!("{e:#}\n{}", host_logs(&lab));
    }
}

/// The tails of the services' logs on the lab hosts, for failure messages.
fn host_logs(lab: &Lab) -> String {
    lab.tails(
        &[
            "hosts/node-a/var-log-ftvm/ftvm.log",
            "hosts/node-b/var-log-ftvm/ftvm.log",
            "hosts/witness-c/var-log-ftvm/ftvm-witness.log",
        ],
        40,
    )
}

/// One lab and its playbook runs.
struct Deployment<'a> {
    lab: &'a Lab,
    bin: &'a Path,
}

impl Deployment<'_> {
    /// `ansible-playbook -i inventories/lab PLAYBOOK ARGS...` against this
    /// lab, with this build's binaries; its output and exit status.
    fn playbook(&self, playbook: &str, args: &[&str]) -> Result<(bool, String)> {
        let mut c = ansible::command(self.bin, "ansible-playbook");
        c.args(["-i", "inventories/lab", playbook])
            .args(args)
            .env("FTVM_LAB_PREFIX", &self.lab.prefix)
            .env("FTVM_LAB_DIR", &self.lab.dir)
            .env("FTVM_BIN_DIR", bin_dir());
        let (out, text) = ansible::run(c)?;
        // Kept for a reader of a failed run.
        let log = self
            .lab
            .dir
            .join(format!("{}.log", playbook.trim_end_matches(".yml")));
        let _ = std::fs::write(log, &text);
        Ok((out.status.success(), text))
    }

    /// Runs a playbook that must succeed with no host failed or unreachable;
    /// its recap's `changed` count per host.
    fn deploy(&self, playbook: &str, args: &[&str]) -> Result<Vec<(String, u64)>> {
        let started = std::time::Instant::now();
        let (ok, text) = self.playbook(playbook, args)?;
        eprintln!("{playbook} {args:?}: {:.0?}", started.elapsed());
        let recap = ansible::recap(&text);
        // Its end names the failed task; the whole run is in the lab's
        // PLAYBOOK.log. Kept short so the nodes' logs below stay in view.
        ensure!(
            ok && !recap.is_empty(),
            "{playbook} failed (last 60 lines):\n{}",
            last_lines(&text, 60).0
        );
        for (host, counts) in &recap {
            ensure!(
                counts.get("failed") == Some(&0) && counts.get("unreachable") == Some(&0),
                "{playbook}: {host} {counts:?}\n{text}"
            );
        }
        Ok(recap
            .into_iter()
            .map(|(h, c)| (h, c.get("changed").copied().unwrap_or(0)))
            .collect())
    }

    /// A node's /status, read on its host with ftvmctl.
    fn status(&self, host: &str) -> Result<serde_json::Value> {
        let out = self.lab.ssh(host, &[FTVMCTL, "ftvm", "status"])?;
        serde_json::from_str(&out).with_context(|| format!("status of {host}: {out}"))
    }

    /// Waits until `primary` is primary and protected and `backup` its
    /// backup in the same epoch; their statuses.
    fn wait_protected(
        &self,
        primary: &str,
        backup: &str,
    ) -> Result<(serde_json::Value, serde_json::Value)> {
        let mut last = None;
        let waited = wait_until(&format!("{primary} protected by {backup}"), || {
            let (p, b) = (self.status(primary)?, self.status(backup)?);
            let done = p["role"] == "primary"
                && p["protected"] == true
                && b["role"] == "backup"
                && b["epoch"] == p["epoch"];
            last = Some((p, b));
            Ok(done)
        });
        match (waited, last) {
            (Ok(()), Some(pair)) => Ok(pair),
            (w, last) => bail!("{w:?}; last statuses: {last:#?}"),
        }
    }

    /// SHA-256 of the `ftvm` installed on `host`, and of the one its node runs.
    fn ftvm_on(&self, host: &str) -> Result<(String, String)> {
        let installed = self.lab.ssh(host, &["sha256sum", "/opt/ftvm/bin/ftvm"])?;
        let running = self.lab.ssh(host, &[FTVMCTL, "ftvm", "running-sha256"])?;
        Ok((first_word(&installed), first_word(&running)))
    }
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or_default().to_string()
}

/// SHA-256 of a file on this machine.
fn sha256(path: &Path) -> Result<String> {
    let out = std::process::Command::new("sha256sum").arg(path).output()?;
    ensure!(
        out.status.success(),
        "sha256sum {}: {out:?}",
        path.display()
    );
    Ok(first_word(&String::from_utf8_lossy(&out.stdout)))
}

fn bin_dir() -> PathBuf {
    ftvm_tests::bin("ftvm")
        .parent()
        .expect("binaries live in a directory")
        .to_path_buf()
}

/// The number of SSH logins each lab host's sshd has accepted so far.
fn logins(lab: &Lab) -> Vec<usize> {
    ["node-a", "node-b", "witness-c"]
        .iter()
        .map(|h| {
            std::fs::read_to_string(lab.dir.join(format!("hosts/{h}/sshd.log")))
                .unwrap_or_default()
                .matches("Accepted publickey")
                .count()
        })
        .collect()
}

fn deploy_and_drill(lab: &Lab, bin: &Path) -> Result<()> {
    let d = Deployment { lab, bin };
    let pki = lab.dir.join("ansible-pki");

    // A wrong setting fails at argument validation, naming the variable,
    // before any host is touched: no login, no PKI, nothing installed.
    let before = logins(lab);
    let (ok, text) = d.playbook("site.yml", &["-e", "ftvm_appliance_disk_reads=sometimes"])?;
    ensure!(!ok, "site.yml accepted disk_reads=sometimes:\n{text}");
    ensure!(
        text.contains("Validation of arguments failed")
            && text.contains("ftvm_appliance_disk_reads")
            && text.contains("sometimes"),
        "the failure does not name the variable:\n{text}"
    );
    ensure!(
        logins(lab) == before,
        "hosts were contacted before the settings were validated: {before:?} -> {:?}",
        logins(lab)
    );
    ensure!(!pki.exists(), "the PKI was created before validation");
    for h in ["node-a", "node-b", "witness-c"] {
        let etc = lab.dir.join(format!("hosts/{h}/etc-ftvm"));
        ensure!(
            std::fs::read_dir(&etc)?.next().is_none(),
            "{} was written",
            etc.display()
        );
    }

    // Deploy, then check the pair as a user would.
    d.deploy("site.yml", &[])?;
    let a = d.status("node-a")?;
    let b = d.status("node-b")?;
    ensure!(
        a["role"] == "primary" && a["protected"] == true && a["peer"]["connected"] == true,
        "site A: {a:#}"
    );
    ensure!(b["role"] == "backup", "site B: {b:#}");
    let epoch = a["epoch"].as_u64().context("epoch")?;
    ensure!(epoch >= 1 && b["epoch"] == epoch, "epochs: {a:#} {b:#}");
    let witness = lab.ssh(
        "witness-c",
        &["/opt/ftvm/sbin/ftvmctl", "ftvm-witness", "status"],
    )?;
    ensure!(
        witness.trim() == format!("cluster=lab epoch={epoch} holder=node-a"),
        "the witness says: {witness}"
    );
    ensure!(
        lab.cli(&["SET", "deployed-by", "ansible"])? == "OK"
            && lab.cli(&["GET", "deployed-by"])? == "ansible",
        "redis-cli in the client namespace does not reach the primary"
    );
    no_host_has_the_ca_key(lab, &pki)?;

    // Nothing left to do: a second run changes nothing.
    let changed = d.deploy("site.yml", &[])?;
    ensure!(
        changed.iter().all(|(_, n)| *n == 0),
        "the second site.yml run changed something: {changed:?}\n{}",
        std::fs::read_to_string(lab.dir.join("site.log")).unwrap_or_default()
    );

    // The hardened units, rendered on each host, pass systemd-analyze verify.
    d.deploy("verify-units.yml", &[])?;

    rolling_upgrade(&d)?;

    // The drills' kill scenarios check that the killed node, restarted,
    // stays fenced, which holds only when the survivor does not take it
    // back by itself: they rehearse with `reprotect = "manual"`, which the
    // nodes read when the drill's reset restarts them. (This run also puts
    // this build's binary back in place of the upgrade's release.)
    d.deploy("site.yml", &["-e", "ftvm_appliance_reprotect=manual"])?;
    for h in ["node-a", "node-b"] {
        let toml = lab.ssh(h, &["cat", "/etc/ftvm/ftvm.toml"])?;
        ensure!(
            toml.lines().any(|l| l == r#"reprotect = "manual""#),
            "{h}: ftvm.toml does not say reprotect = \"manual\":\n{toml}"
        );
    }

    // Drills at the lab's 20 ms, and one at 50 ms one-way delay: each run
    // brings its report back into a folder of its own.
    let reports = lab.dir.join("drill-reports");
    for (scenario, delay) in [
        ("kill-primary", WAN_DELAY_MS),
        ("partition-sites", WAN_DELAY_MS),
        ("kill-primary", 50),
    ] {
        let before = report_folders(&reports);
        d.deploy(
            "drill.yml",
            &[
                "-e",
                &format!("scenario={scenario}"),
                "-e",
                &format!("wan_delay_ms={delay}"),
            ],
        )?;
        let new: Vec<PathBuf> = report_folders(&reports)
            .into_iter()
            .filter(|p| !before.contains(p))
            .collect();
        let [run] = new.as_slice() else {
            bail!("expected one new report folder for {scenario}, found {new:?}");
        };
        check_report(run, scenario, delay)?;
    }
    Ok(())
}

/// upgrade.yml against the deployed pair (node-a primary, node-b backup):
/// with nothing to upgrade it changes nothing; with the backup down it
/// refuses and changes nothing, and the backup, started again without
/// `--join`, rejoins by itself (`reprotect = "auto"`, the role's default);
/// then, while Redis clients write, it upgrades both nodes to a new
/// release. The release is this build's `ftvm` with bytes appended (an
/// ELF binary runs the same with trailing data): a different file,
/// recognised by its SHA-256 on each host, installed and running.
fn rolling_upgrade(d: &Deployment) -> Result<()> {
    let lab = d.lab;
    let log = || std::fs::read_to_string(lab.dir.join("upgrade.log")).unwrap_or_default();
    let build = sha256(&bin_dir().join("ftvm"))?;
    let release = lab.dir.join("release-2");
    std::fs::create_dir_all(&release)?;
    std::fs::copy(bin_dir().join("ftvm"), release.join("ftvm"))?;
    std::fs::OpenOptions::new()
        .append(true)
        .open(release.join("ftvm"))?
        .write_all(b"\nftvm-tests: release 2 of the rolling upgrade\n")?;
    let new = sha256(&release.join("ftvm"))?;
    ensure!(new != build, "the release is the same file as the build");
    let from_release = format!("ftvm_binaries_src={}", release.display());

    // Both nodes run this build already: nothing to do.
    let changed = d.deploy("upgrade.yml", &[])?;
    ensure!(
        changed.iter().all(|(_, n)| *n == 0) && log().contains("Nothing to upgrade"),
        "upgrade.yml with nothing to upgrade: {changed:?}\n{}",
        log()
    );

    // The backup is down: refused, naming why, and nothing installed.
    lab.ssh("node-b", &[FTVMCTL, "ftvm", "stop"])?;
    let (ok, text) = d.playbook("upgrade.yml", &["-e", &from_release])?;
    let recap = ansible::recap(&text);
    ensure!(
        !ok && text.contains("Refusing to upgrade")
            && text.contains("node-b does not answer")
            && text.contains("Nothing was changed")
            && !recap.is_empty()
            && recap.values().all(|c| c.get("changed") == Some(&0)),
        "upgrade.yml with the backup down:\n{text}"
    );
    let a = d.status("node-a")?;
    ensure!(
        d.ftvm_on("node-a")? == (build.clone(), build.clone())
            && (a["role"] == "primary" || a["role"] == "solo"),
        "the refused upgrade touched node-a: {a:#}"
    );
    // Started as configured (no --join), it rejoins the primary by itself.
    lab.ssh("node-b", &[FTVMCTL, "ftvm", "start"])?;
    let (_, b) = d.wait_protected("node-a", "node-b")?;
    ensure!(
        b["role_reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("rejoined node-a")),
        "node-b: {b:#}"
    );

    // The upgrade, under load.
    let service = format!("{}:6379", site::GUEST_IP);
    let clients = Load::start(&service, Some(&lab.ns("c")), 4, "upgrade", 12);
    let acked = || {
        acked_writes(
            &clients
                .history
                .records
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    };
    wait_until("the clients' first acknowledged write", || Ok(acked() > 0))?;
    let epoch = d.status("node-a")?["epoch"].as_u64().context("epoch")?;
    let upgraded = d.deploy("upgrade.yml", &["-e", &from_release]);
    // The clients go on through the new primary on the same connections.
    let after = acked();
    let more = match &upgraded {
        Ok(_) => wait_until("a write acknowledged after the upgrade", || {
            Ok(acked() > after)
        }),
        Err(_) => Ok(()),
    };
    let history = clients.stop();
    upgraded?;
    more?;

    // The roles swapped, protected; both nodes installed and run the release.
    let (b, a) = d.wait_protected("node-b", "node-a")?;
    ensure!(
        b["epoch"].as_u64() > Some(epoch),
        "no switchover: {b:#}\n{a:#}"
    );
    for h in ["node-a", "node-b"] {
        let (installed, running) = d.ftvm_on(h)?;
        ensure!(
            installed == new && running == new,
            "{h}: installed {installed}, running {running}, release {new}\n{}",
            log()
        );
    }

    // What the clients saw: every request answered without error on the
    // connections they opened, and every key holds its last acknowledged
    // write (or a later one), read back on a fresh connection.
    let records = history
        .records
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let failed: Vec<_> = records
        .iter()
        .filter(|r| r.end.is_none() || r.error.is_some())
        .collect();
    ensure!(
        failed.is_empty() && history.broken.load(std::sync::atomic::Ordering::Relaxed) == 0,
        "client requests failed during the upgrade: {failed:#?}"
    );
    let mut keys: Vec<String> = records.iter().map(|r| r.key.clone()).collect();
    keys.sort();
    keys.dedup();
    let finals: HashMap<String, Option<String>> =
        load::final_reads(&service, Some(&lab.ns("c")), keys)
            .map_err(|e| anyhow::anyhow!(e))?
            .into_iter()
            .map(|(k, _, v, _)| (k, v))
            .collect();
    let lost = load::lost_writes(&records, &finals);
    eprintln!(
        "rolling upgrade: {} writes acknowledged, {} lost, epoch {epoch} -> {}",
        acked_writes(&records),
        lost,
        b["epoch"]
    );
    ensure!(lost == 0, "{lost} acknowledged writes lost in the upgrade");
    ensure!(acked_writes(&records) > after, "no write after the upgrade");
    Ok(())
}

fn acked_writes(records: &[load::Record]) -> usize {
    records
        .iter()
        .filter(|r| r.write.is_some() && r.end.is_some() && r.error.is_none())
        .count()
}

/// The CA key stays on the control node: no file on any host holds it,
/// and each host got its own key only.
fn no_host_has_the_ca_key(lab: &Lab, pki: &Path) -> Result<()> {
    let ca_key = std::fs::read(pki.join("ca.key")).context("the control node's CA key")?;
    let mut keys = Vec::new();
    let mut stack = vec![lab.dir.join("hosts")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            if path.extension().is_some_and(|e| e == "key") {
                keys.push(
                    path.file_name()
                        .context("name")?
                        .to_string_lossy()
                        .into_owned(),
                );
            }
            let same_size = path.metadata()?.len() == ca_key.len() as u64;
            ensure!(
                !(same_size && std::fs::read(&path)? == ca_key),
                "{} holds the CA key",
                path.display()
            );
        }
    }
    keys.sort();
    ensure!(
        keys == ["node-a.key", "node-b.key", "witness-c.key"],
        "keys on the hosts: {keys:?}"
    );
    Ok(())
}

fn report_folders(reports: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(reports)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default()
}

/// A drill's report on the control node: every iteration passed with no
/// acknowledged write lost, at the WAN delay used, and the plot shows the
/// requests.
fn check_report(run: &Path, scenario: &str, delay_ms: u64) -> Result<()> {
    ensure!(
        run.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("{scenario}-"))),
        "report folder {} is not named after {scenario}",
        run.display()
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("report.json"))?)?;
    let iterations = report.as_array().context("report.json is a list")?;
    ensure!(!iterations.is_empty(), "no iteration in {}", run.display());
    for it in iterations {
        ensure!(
            it["scenario"] == scenario
                && it["passed"] == true
                && it["writes_lost"] == 0
                && it["writes_acknowledged"].as_u64() > Some(0)
                && it["wan_delay_ms"] == delay_ms,
            "{scenario}: {it:#}"
        );
        let n = it["iteration"].as_u64().context("iteration")?;
        let svg = std::fs::read_to_string(run.join(format!("{scenario}-{n}.svg")))?;
        // One dot per answered request, and the fault marked.
        let dots = svg.matches("<circle").count();
        ensure!(
            svg.starts_with("<svg") && dots > 100 && svg.contains("fault"),
            "{scenario}-{n}.svg has {dots} points"
        );
        eprintln!(
            "{scenario} at {delay_ms} ms: {} writes acknowledged, {} lost; fault to first reply {} ms, to go-live {} ms",
            it["writes_acknowledged"], it["writes_lost"], it["first_reply_after_fault_ms"], it["fault_to_live_ms"]
        );
    }
    let summary = std::fs::read_to_string(run.join("summary.md"))?;
    ensure!(
        summary.contains(&format!("WAN one-way delay {delay_ms} ms")) && summary.contains("PASS"),
        "{summary}"
    );
    Ok(())
}
