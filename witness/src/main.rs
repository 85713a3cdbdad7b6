//! `ftvm-witness`: run the witness, show its state, or claim by hand.

use anyhow::Context;
use clap::{Parser, Subcommand};
use ftvm_config::witness::{WitnessClientConfig, WitnessConfig};
use ftvm_witness::backend::error_chain;
use ftvm_witness::proto::ClusterStatus;
use ftvm_witness::{server, ClaimOutcome, ClientError, Store, WitnessClient};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "ftvm-witness",
    version,
    about = "The ftvm witness: grants exactly one claim per epoch"
)]
struct Cli {
    /// Log as JSON lines.
    #[arg(long, global = true)]
    json_logs: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve claims for the clusters in the config.
    Run {
        #[arg(long)]
        config: PathBuf,
    },
    /// Print each cluster's epoch and holder. With a witness file: asks the
    /// running witness over QUIC when it has a [control] table, else reads
    /// the database (only possible while no witness holds it). With a node
    /// file ([witness], kind "ftvm" or "etcd"): asks that witness about
    /// --cluster, else the file's cluster, else every cluster.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Claim epoch E+1 of cluster C by hand, as the node whose certificate the
    /// config names (a node file with [witness], kind "ftvm" or "etcd", or a
    /// witness file with [control]). Prints `GRANTED epoch=<n>` or
    /// `DENIED holder=<node> epoch=<n>`.
    Claim {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        epoch: u64,
    },
}

fn init_logs(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    if json {
        b.json().init();
    } else {
        b.init();
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.json_logs);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ftvm-witness: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let res = rt.block_on(async {
        match cli.cmd {
            Cmd::Run { config } => run(&config).await.map(|()| ExitCode::SUCCESS),
            Cmd::Status { config, cluster } => status(&config, cluster.as_deref())
                .await
                .map(|()| ExitCode::SUCCESS),
            Cmd::Claim {
                config,
                cluster,
                epoch,
            } => claim(&config, &cluster, epoch).await,
        }
    });
    match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftvm-witness: error: {}", error_chain(e.as_ref()));
            ExitCode::from(2)
        }
    }
}

async fn run(config: &Path) -> anyhow::Result<()> {
    let cfg = WitnessConfig::load(config)?;
    let srv = server::start(&cfg).context("witness refused to start")?;
    let addr = srv.local_addr().context("local address")?;
    tracing::info!(%addr, node = %cfg.server.node, db = %cfg.server.db.display(), clusters = cfg.clusters.len(), "witness serving");
    // The bound address, for scripts and tests that listen on port 0.
    println!("LISTENING {addr}");
    std::io::stdout().flush().ok();
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(error = %e, "cannot watch SIGTERM");
                    return std::future::pending().await;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping"),
        }
    };
    srv.serve(shutdown).await;
    Ok(())
}

fn print_status(clusters: &[ClusterStatus]) {
    for c in clusters {
        println!(
            "cluster={} epoch={} holder={}",
            c.name,
            c.epoch,
            c.holder.as_deref().unwrap_or("-")
        );
    }
}

async fn status(config: &Path, cluster: Option<&str>) -> anyhow::Result<()> {
    if let Some(node) = node_config(config)? {
        let client = ftvm_witness::from_config(&node)?;
        let clusters = match cluster.or(node.cluster.as_deref()) {
            Some(c) => client.status_in(c).await.map(|s| vec![s]),
            None => client.status_all().await,
        };
        client.close().await;
        print_status(&clusters.with_context(|| format!("status from {}", client.target()))?);
        return Ok(());
    }
    let cfg = WitnessConfig::load(config)?;
    if let Some(control) = &cfg.control {
        let client = WitnessClient::from_config(control)?;
        let asked = match cluster {
            Some(c) => client.status_of(Some(c)).await,
            None => client.status_of(None).await,
        };
        match asked {
            Ok(clusters) => {
                print_status(&clusters);
                client.close().await;
                return Ok(());
            }
            Err(e @ ClientError::NoAnswer { .. }) => {
                tracing::warn!(error = %e, "running witness did not answer; reading the database");
            }
            Err(e) => return Err(e).context("status from the running witness"),
        }
    }
    let store = Store::open_existing(&cfg.server.db).context(if cfg.control.is_none() {
        "reading the database (add a [control] table to ask a running witness instead)"
    } else {
        "reading the database"
    })?;
    let clusters: Vec<ClusterStatus> = cfg
        .clusters
        .iter()
        .filter(|c| cluster.is_none_or(|want| want == c.name))
        .map(|c| {
            store.get(&c.name).map(|st| ClusterStatus {
                name: c.name.clone(),
                epoch: st.epoch,
                holder: st.holder,
            })
        })
        .collect::<Result<_, _>>()?;
    if let Some(want) = cluster {
        if clusters.is_empty() {
            anyhow::bail!("{}: serves no cluster {want:?}", config.display());
        }
    }
    print_status(&clusters);
    Ok(())
}

/// The `[witness]` table of a node file, or `None` for a witness file.
fn node_config(config: &Path) -> anyhow::Result<Option<WitnessClientConfig>> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("{}: cannot read config", config.display()))?;
    let value: toml::Table = ftvm_config::parse_toml(config, &text)?;
    if value.contains_key("witness") {
        return Ok(Some(WitnessClientConfig::load(config)?));
    }
    Ok(None)
}

/// A node file (`[witness]`) or a witness file with `[control]`.
fn client_config(config: &Path) -> anyhow::Result<WitnessClientConfig> {
    if let Some(node) = node_config(config)? {
        return Ok(node);
    }
    let cfg = WitnessConfig::load(config)?;
    cfg.control.ok_or_else(|| {
        anyhow::anyhow!(
            "{}: has neither a [witness] table (node settings) nor a [control] table",
            config.display()
        )
    })
}

async fn claim(config: &Path, cluster: &str, epoch: u64) -> anyhow::Result<ExitCode> {
    let cfg = client_config(config)?;
    let client = ftvm_witness::from_config(&cfg)?;
    let outcome = client.claim_in(cluster, epoch).await;
    client.close().await;
    match outcome? {
        ClaimOutcome::Granted { epoch } => {
            println!("GRANTED epoch={epoch}");
            Ok(ExitCode::SUCCESS)
        }
        ClaimOutcome::Denied { holder, epoch } => {
            println!(
                "DENIED holder={} epoch={epoch}",
                holder.as_deref().unwrap_or("-")
            );
            Ok(ExitCode::from(1))
        }
    }
}
