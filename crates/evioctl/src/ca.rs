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

/// Parses a duration: a number of seconds or a number with a unit `s`, `m`, `h` or `d` (`90s`, `1h`, `30d`).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 's')) => (&s[..i], 1),
        Some((i, 'm')) => (&s[..i], 60),
        Some((i, 'h')) => (&s[..i], 3600),
        Some((i, 'd')) => (&s[..i], 86_400),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 90s, 30m, 1h, 7d)"))?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(format!("{s:?}: must be positive and reasonable")),
        Some(v) => Ok(v),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations() {
        use super::parse_duration as p;
        assert_eq!(p("90"), Ok(90));
        assert_eq!(p("90s"), Ok(90));
        assert_eq!(p("30m"), Ok(1800));
        assert_eq!(p("1h"), Ok(3600));
        assert_eq!(p("7d"), Ok(7 * 86_400));
        assert!(p("0h").is_err());
        assert!(p("h").is_err());
        assert!(p("1w").is_err());
        assert!(p("-1h").is_err());
    }
}
