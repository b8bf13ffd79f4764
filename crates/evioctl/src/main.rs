//! `evioctl`: the operator CLI. One module per subcommand.

mod ca;
mod ca_serve;
mod cni_config;
mod duration;
mod nodes;
mod release;
mod revoke;
mod status;
mod token;
mod ui;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "evioctl", version, about = "evio operator CLI")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Claim this node's pod subnet in etcd and install the CNI configuration and plugin.
    CniConfig(cni_config::Args),
    /// List the nodes: pod subnet claims, host overlay addresses and whether each agent is alive.
    Nodes(nodes::Args),
    /// Free a departed node's pod subnet and host overlay address claims.
    Release(release::Args),
    /// Show the local agent's overlay state and peers.
    Status(status::Args),
    /// The cluster CA: `ca init` creates it, `ca serve` signs node certificates.
    Ca(ca::Args),
    /// Join tokens: create, list, delete.
    Token(token::Args),
    /// Revoke a node's key and certificate and free its claims.
    Revoke(revoke::Args),
    /// Serve a live topology page of the cluster (nodes, peer paths) read from etcd.
    Ui(ui::Args),
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::CniConfig(a) => cni_config::run(a),
        Cmd::Nodes(a) => nodes::run(a),
        Cmd::Release(a) => release::run(a),
        Cmd::Status(a) => status::run(a),
        Cmd::Ca(a) => ca::run(a),
        Cmd::Token(a) => token::run(a),
        Cmd::Revoke(a) => revoke::run(a),
        Cmd::Ui(a) => ui::run(a),
    };
    if let Err(e) = res {
        eprintln!("evioctl: {e:#}");
        std::process::exit(1);
    }
}
