//! `evioctl ca init` (create the cluster CA) and `evioctl ca serve` (the signer, in [`crate::ca_serve`]).

use std::path::PathBuf;

use anyhow::{Result, bail};
use evio_trust::CaKey;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Create the cluster CA in DIR: ca.key (0600) and ca.json; prints the CA pin.
    Init(InitArgs),
    /// Sign certificates: watch join and renewal requests in etcd and answer them.
    Serve(crate::ca_serve::Args),
}

#[derive(clap::Args)]
pub struct InitArgs {
    /// The CA directory (created 0700 if missing). Keep it on the operator's machine, not on the nodes.
    #[arg(long)]
    pub dir: PathBuf,
    /// The CA's name (shown in ca.json and tokens).
    #[arg(long, default_value = "evio")]
    pub name: String,
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Init(a) => init(a),
        Cmd::Serve(a) => crate::ca_serve::run(a),
    }
}

fn init(a: InitArgs) -> Result<()> {
    if a.name.is_empty() || a.name.len() > 64 || a.name.chars().any(char::is_control) {
        bail!("--name must be 1-64 printable characters");
    }
    let ca = CaKey::init_dir(&a.dir, &a.name)?;
    eprintln!(
        "evioctl: created the cluster CA {:?} in {} (ca.key is secret: mode 0600, keep it there)",
        a.name,
        a.dir.display()
    );
    println!("{}", ca.public().pin());
    Ok(())
}
