//! `evioctl token create|list|delete`: join tokens. `create` prints the token (a secret) on stdout and keeps
//! only its id, derived MAC key, expiry, single-use flag and use count in `<ca-dir>/tokens/<id>.json` (0600).

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use evio_store::EtcdOptions;
use evio_trust::{CaPublic, JoinToken, TokenRecord, unix_now};
use serde_json::json;

use crate::duration::parse_duration;
use crate::nodes::format_utc;

#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(clap::Subcommand)]
pub enum Cmd {
    /// Create a join token and print it (only it) on stdout.
    Create(CreateArgs),
    /// List the tokens (never their secrets).
    List(ListArgs),
    /// Delete a token: it can no longer be used to join.
    Delete(DeleteArgs),
}

#[derive(clap::Args)]
pub struct CreateArgs {
    /// The CA directory (`evioctl ca init --dir`).
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// etcd client URLs the joining host will use, comma-separated.
    #[arg(long)]
    pub etcd_endpoints: String,
    /// etcd user to put in the token (labs with etcd auth).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// File holding that user's password (it goes into the token).
    #[arg(long)]
    pub etcd_password_file: Option<PathBuf>,
    /// How long the token may be used (e.g. 30m, 1h, 7d).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub ttl: u64,
    /// Let the token join any number of hosts until it expires (default: one host).
    #[arg(long)]
    pub reusable: bool,
    /// STUN server (HOST:PORT) for the joining host; repeatable.
    #[arg(long)]
    pub stun: Vec<String>,
    /// TURN server (HOST:PORT).
    #[arg(long)]
    pub turn: Option<String>,
    /// TURN user.
    #[arg(long, requires = "turn")]
    pub turn_user: Option<String>,
    /// File holding the TURN password (it goes into the token).
    #[arg(long, requires = "turn_user")]
    pub turn_password_file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct ListArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// Print one JSON array instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct DeleteArgs {
    #[arg(long)]
    pub ca_dir: PathBuf,
    /// The token id (from `token list`).
    pub id: String,
}

pub fn run(args: Args) -> Result<()> {
    match args.cmd {
        Cmd::Create(a) => create(a),
        Cmd::List(a) => list(a),
        Cmd::Delete(a) => {
            TokenRecord::delete(&a.ca_dir, &a.id)?;
            eprintln!("evioctl: deleted token {}", a.id);
            Ok(())
        }
    }
}

fn create(a: CreateArgs) -> Result<()> {
    let ca = CaPublic::load(&a.ca_dir.join("ca.json")).with_context(|| {
        format!(
            "reading the CA in {} (create it with `evioctl ca init --dir`)",
            a.ca_dir.display()
        )
    })?;
    let endpoints = EtcdOptions::split_endpoints(&a.etcd_endpoints);
    if endpoints.is_empty() {
        bail!("--etcd-endpoints is empty");
    }
    let now = unix_now();
    let mut t = JoinToken::new(&ca, endpoints, now + a.ttl);
    t.etcd_user = a.etcd_user;
    if let Some(f) = &a.etcd_password_file {
        if t.etcd_user.is_none() {
            bail!("--etcd-password-file needs --etcd-user");
        }
        t.etcd_password = Some(evio_store::read_secret_file(f, "etcd password")?);
    }
    t.stun = a.stun;
    t.turn = a.turn;
    t.turn_user = a.turn_user;
    if let Some(f) = &a.turn_password_file {
        t.turn_password = Some(evio_store::read_secret_file(f, "TURN password")?);
    }
    TokenRecord::of(&t, !a.reusable, now).create(&a.ca_dir)?;
    eprintln!(
        "evioctl: token {} ({}) expires {} UTC",
        t.id,
        if a.reusable { "reusable" } else { "single use" },
        format_utc(t.expires)
    );
    println!("{}", t.encode());
    Ok(())
}

fn list(a: ListArgs) -> Result<()> {
    let now = unix_now();
    let v = TokenRecord::list(&a.ca_dir)?;
    let state = |r: &TokenRecord| match r.check_usable(now) {
        Ok(()) => "usable",
        Err(evio_trust::TrustError::TokenExpired { .. }) => "expired",
        Err(_) => "used",
    };
    if a.json {
        let rows: Vec<_> = v
            .iter()
            .map(|r| {
                json!({"id": r.id, "created": r.created, "expires": r.expires,
                       "singleUse": r.single_use, "uses": r.uses, "state": state(r)})
            })
            .collect();
        println!("{}", serde_json::Value::Array(rows));
        return Ok(());
    }
    println!(
        "{:<16}  {:<19}  {:<10}  {:>4}  STATE",
        "ID", "EXPIRES (UTC)", "SINGLE-USE", "USES"
    );
    for r in &v {
        println!(
            "{:<16}  {:<19}  {:<10}  {:>4}  {}",
            r.id,
            format_utc(r.expires),
            if r.single_use { "yes" } else { "no" },
            r.uses,
            state(r)
        );
    }
    Ok(())
}
