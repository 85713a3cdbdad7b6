//! Running the project's Ansible playbooks (ansible/) from tests: the
//! ansible-core and ansible-lint that scripts/setup.sh installs into
//! target/ansible-venv, and the PLAY RECAP of a run.

use anyhow::{Context, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The directory holding `ansible-playbook` and `ansible-lint`:
/// `$FTVM_ANSIBLE_VENV/bin`, or target/ansible-venv/bin (scripts/setup.sh).
/// Otherwise prints a SKIPPED line saying how to get them.
pub fn bin_dir(test: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("FTVM_ANSIBLE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::repo_root().join("target/ansible-venv"));
    let bin = venv.join("bin");
    let works = |tool: &str| {
        Command::new(bin.join(tool))
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if works("ansible-playbook") && works("ansible-lint") {
        return Some(bin);
    }
    crate::skip(
        test,
        &format!(
            "ansible-playbook or ansible-lint does not run from {} (run scripts/setup.sh, or set FTVM_ANSIBLE_VENV)",
            bin.display()
        ),
    );
    None
}

/// The project's ansible/ folder (playbooks, roles, inventories, ansible.cfg).
pub fn dir() -> PathBuf {
    crate::repo_root().join("ansible")
}

/// A command running `tool` from `bin` in ansible/ (so its ansible.cfg
/// applies), with the venv first on PATH and plain output.
pub fn command(bin: &Path, tool: &str) -> Command {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![bin.to_path_buf()];
    paths.extend(std::env::split_paths(&path));
    let mut c = Command::new(bin.join(tool));
    c.current_dir(dir())
        .env(
            "PATH",
            std::env::join_paths(paths).expect("PATH entries hold no separator"),
        )
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0");
    c
}

/// Runs `cmd`; its output whatever the exit status, and both streams as
/// one text for messages.
pub fn run(mut cmd: Command) -> Result<(Output, String)> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out, text))
}

/// The PLAY RECAP of an ansible-playbook run: per host, each counter
/// (`ok`, `changed`, `unreachable`, `failed`, ...).
pub fn recap(output: &str) -> BTreeMap<String, BTreeMap<String, u64>> {
    let mut hosts = BTreeMap::new();
    let Some((_, tail)) = output.split_once("PLAY RECAP") else {
        return hosts;
    };
    for line in tail.lines().skip(1) {
        let Some((host, counters)) = line.split_once(" : ") else {
            continue;
        };
        let counts = counters
            .split_whitespace()
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.to_string(), v.parse().ok()?))
            })
            .collect();
        hosts.insert(host.trim().to_string(), counts);
    }
    hosts
}

#[cfg(test)]
mod tests {
    #[test]
    fn recap_reads_each_hosts_counters() {
        let out = "TASK [x] ***\nok: [a]\n\nPLAY RECAP *****\n\
            node-a                     : ok=34   changed=15   unreachable=0    failed=0    skipped=5    rescued=0    ignored=0   \n\
            witness-c                  : ok=28   changed=0    unreachable=0    failed=1    skipped=4    rescued=0    ignored=0   \n";
        let r = super::recap(out);
        assert_eq!(r.len(), 2);
        assert_eq!(r["node-a"]["changed"], 15);
        assert_eq!(r["witness-c"]["failed"], 1);
        assert!(super::recap("no recap here").is_empty());
    }
}
