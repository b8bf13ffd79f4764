//! `evioctl release NODE [--force]`: frees a node's pod subnet claim (and its host overlay address claim),
//! refusing while the node's agent is alive (registered with a live lease) unless `--force`.

use anyhow::{Result, bail};
use evio_store::Store;

use crate::cni_config::{EtcdArgs, runtime};

#[derive(clap::Args)]
pub struct Args {
    /// The node whose claims to free.
    pub node: String,
    /// Free the claims even while the node's agent is registered (it will keep using the subnet!).
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

pub fn run(args: Args) -> Result<()> {
    let opts = args.etcd.options(None)?;
    runtime()?.block_on(async {
        let store = Store::connect(&opts).await?;
        if let Some(rec) = store.node(&args.node).await? {
            if !args.force {
                bail!(
                    "node {} is alive (its agent is registered with a live lease, record updated at {} UTC); \
                     stop it first, or use --force",
                    args.node,
                    crate::nodes::format_utc(rec.updated)
                );
            }
            eprintln!("evioctl: warning: releasing the claims of live node {} (--force)", args.node);
        }
        let subnet = store.release_subnet(&args.node).await?;
        let address = store.release_address(&args.node).await?;
        match (&subnet, &address) {
            (None, None) => println!("node {} holds no claims", args.node),
            _ => {
                if let Some(s) = subnet {
                    println!("released pod subnet {} of node {}", s.subnet, args.node);
                }
                if let Some(a) = address {
                    println!("released host address {} of node {}", a.address, args.node);
                }
            }
        }
        Ok(())
    })
}
