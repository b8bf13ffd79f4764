//! `eviod`: the evio node agent. Gives this host a VIP on the host overlay and carries host-to-host and
//! pod-to-pod traffic to the other nodes through WireGuard-protocol tunnels, with etcd as control plane.
//!
//! Threads: three data plane threads (TUN->UDP, UDP->TUN, timers; see `dataplane`), the control socket and
//! metrics servers, a single-threaded tokio runtime for the control plane (etcd) and its `evio-apply`
//! thread for blocking work (routes, cache file). No lock around the tunnel core: status, metrics and the
//! control plane never make forwarding wait (see `evio_tunnel`'s node docs). Docs: docs/overlay.md.
//!
//! Dependencies: `evio-tunnel` (the sans-IO protocol core over boringtun), `evio-store` (etcd), `clap`,
//! `tokio` (only for the etcd client), `tracing`, `serde_json`, `base64` (key files in `wg` format),
//! `nix` (getifaddrs), `evio-netlink` (TUN address and routes), `evio-fastio` (TUN with offloads, batched UDP with GSO/GRO).

mod cluster;
mod config;
mod control;
mod ctl;
mod dataplane;
mod keys;
mod metrics;
mod nat;
mod netcfg;
mod paths;
mod state;
mod trust;

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use evio_overlay::{self as overlay, OverlayNode};
use evio_store::{Store, StoreError};

use crate::config::{Args, Config};
use crate::control::{Cache, Control};
use crate::state::{SelfInfo, Shared};

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("EVIO_LOG")
                .unwrap_or_else(|_| "info,boringtun=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let res = args.resolve().and_then(run);
    if let Err(e) = res {
        tracing::error!("{e:#}");
        eprintln!("eviod: {e:#}");
        std::process::exit(1);
    }
}

/// Claims the VIP, with retries while etcd is unreachable; falls back to the cached VIP after a while.
/// Claims are keyed by node name: an agent started with the name of a live node that registered another key
/// must not touch its claims (it waits until that registration's lease expires; docs/security.md).
async fn claim_address(
    cfg: &Config,
    public_key: &[u8; 32],
    cache: Option<&Cache>,
) -> Result<(Option<Store>, Ipv4Addr)> {
    let mut waited = Duration::ZERO;
    let ours = keys::encode(public_key);
    loop {
        let r = async {
            let s = Store::connect(&cfg.etcd).await?;
            if let Some(r) = s.node(&cfg.node_name).await?
                && r.public_key != ours
            {
                return Err(StoreError::NameTaken {
                    node: cfg.node_name.clone(),
                    holder_key: r.public_key,
                });
            }
            let c = s
                .claim_address(&cfg.overlay_cidr, &cfg.node_name, cfg.address)
                .await?;
            Ok::<_, StoreError>((s, c))
        }
        .await;
        match r {
            Ok((s, c)) => return Ok((Some(s), c.address)),
            Err(
                e @ (StoreError::Conflict { .. }
                | StoreError::BadAddress { .. }
                | StoreError::AddressesExhausted { .. }),
            ) => {
                bail!("cannot claim the overlay address: {e}")
            }
            Err(e @ StoreError::NameTaken { .. }) => {
                tracing::error!("{e}; waiting");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            Err(e) if e.is_unreachable() => {
                if let Some(a) = cache
                    .and_then(|c| c.address)
                    .filter(|a| cfg.address.is_none_or(|r| r == *a))
                    && waited >= Duration::from_secs(3)
                {
                    tracing::warn!(
                        "etcd unreachable ({e}); starting with the cached address {a} and peers"
                    );
                    return Ok((None, a));
                }
                tracing::warn!("etcd unreachable, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
            Err(e) => bail!("cannot claim the overlay address: {e}"),
        }
    }
}

/// CA mode: the node's certificate (joined for or renewed when etcd answers; the stored one when etcd stays
/// unreachable), and so the VIP it grants.
async fn certified_address(
    cfg: &Config,
    ca: &evio_trust::CaPublic,
    private_key: &[u8; 32],
    public_key: &[u8; 32],
) -> Result<(Option<Store>, evio_trust::NodeCert, String)> {
    let mut waited = Duration::ZERO;
    loop {
        match Store::connect(&cfg.etcd).await {
            Ok(s) => {
                let (c, signed) = trust::certificate(cfg, &s, ca, private_key, public_key).await?;
                return Ok((Some(s), c, signed));
            }
            Err(e) if e.is_unreachable() => {
                if waited >= Duration::from_secs(3)
                    && let Some((c, signed)) = trust::stored_certificate(cfg, ca, public_key)
                {
                    tracing::warn!("etcd unreachable ({e}); starting with the stored certificate");
                    return Ok((None, c, signed));
                }
                tracing::warn!("etcd unreachable, retrying: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                waited += Duration::from_secs(1);
            }
            Err(e) => bail!("cannot reach etcd: {e}"),
        }
    }
}

fn run(mut cfg: Config) -> Result<()> {
    std::fs::create_dir_all(&cfg.state_dir)
        .with_context(|| format!("cannot create {}", cfg.state_dir.display()))?;
    std::fs::set_permissions(&cfg.state_dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some(token) = cfg.join_token.take() {
        trust::adopt_token(&cfg.state_dir, &token)?;
    }
    trust::fill_config(&mut cfg)?;
    if cfg.etcd.endpoints.is_empty() {
        bail!("--etcd-endpoints is required (or --join-token)");
    }
    let ca = trust::pinned_ca(&cfg.state_dir)?;
    if ca.is_some() && cfg.address.is_some() {
        bail!("--address cannot be used with a cluster CA: the signer assigns the VIP");
    }
    let secret = keys::load_or_create(&cfg.state_dir)?;
    let secret_bytes = secret.to_bytes();
    let public_key = keys::public_of(&secret);
    let psk = cfg.psk_file.as_deref().map(keys::read_psk).transpose()?;
    let (stun, turn) = nat::agent_settings(&cfg.nat)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let cache = Cache::load(&cfg.state_dir);

    // The data plane first, without an address yet: NAT traversal gathers our public mapping and relay
    // while the VIP is claimed or the certificate is asked for (both wait for etcd and, in CA mode, the
    // signer; at a 100-node start each took seconds, as did the TURN server's answers), so the first
    // registration has them. No peer is added before the control plane runs.
    let host = netcfg::host_addresses(&cfg.interface, &cfg.overlay_networks());
    let mtu = cfg.mtu.unwrap_or_else(|| {
        netcfg::underlay_mtu(&host)
            .saturating_sub(evio_tunnel::OVERHEAD as u32)
            .max(1280)
    });
    let mut tun_opts = evio_fastio::TunOptions::new(&cfg.interface, mtu);
    tun_opts.multi_queue = cfg.tun_queues > 1;
    let tun = evio_fastio::Tun::with_options(tun_opts)
        .with_context(|| format!("cannot create TUN device {}", cfg.interface))?;
    tracing::info!(
        offloads = tun.offload_flags(),
        vnet_hdr = tun.has_vnet_hdr(),
        "TUN device"
    );
    // One socket for both underlay families (issue 15); IPv4 only where the kernel has no IPv6.
    let sock = match evio_fastio::bind_dual_stack(cfg.listen_port) {
        Ok(s) => s,
        Err(e) => {
            tracing::info!("no IPv6 socket ({e}): the underlay is IPv4 only");
            std::net::UdpSocket::bind((std::net::Ipv4Addr::UNSPECIFIED, cfg.listen_port))
                .with_context(|| format!("cannot bind UDP port {}", cfg.listen_port))?
        }
    };
    let udp = evio_fastio::UdpBatch::new(sock)?;
    if let Err(e) = udp.set_buffer_sizes(8 << 20) {
        tracing::warn!("socket buffer sizes: {e}");
    }
    let port = udp.local_addr()?.port();
    if cfg.peers.lazy {
        tracing::info!(pinned = ?cfg.peers.pinned, idle_timeout = ?cfg.peers.idle_timeout, "lazy peers");
    }
    tracing::info!(?stun, turn = ?turn.as_ref().map(|t| t.server), "NAT traversal");
    tracing::info!(
        gso_segments = udp.max_gso_segments(),
        gro_segments = udp.gro_segments(),
        "UDP socket"
    );
    let overlay = OverlayNode::new(
        overlay::Config {
            private_key: secret,
            preshared_key: psk,
            persistent_keepalive: Some(25),
            port,
            hosts: host.iter().map(|a| a.addr).collect(),
            stun: stun.clone(),
            turn: turn.clone(),
            lazy: cfg.peers.lazy,
            idle_timeout: cfg.peers.idle_timeout,
            unix_time: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default(),
            seed: rand::random(),
        },
        std::time::Instant::now(),
    );
    let shared = Arc::new(Shared::new(
        overlay,
        SelfInfo {
            node: cfg.node_name.clone(),
            address: None,
            pod_subnet: cache.as_ref().and_then(|c| c.pod_subnet),
            public_key: keys::encode(&public_key),
        },
    ));
    let threads = dataplane::start(shared.clone(), tun, udp, mtu, cfg.tun_queues)?;
    // Should the claim or the join fail, the threads stop with the process (the TUN device goes with
    // its file descriptors).
    let (store, address, cert) = match &ca {
        Some(ca) => {
            let (s, c, signed) =
                rt.block_on(certified_address(&cfg, ca, &secret_bytes, &public_key))?;
            (s, c.address, Some((c, signed)))
        }
        None => {
            let (s, a) = rt.block_on(claim_address(&cfg, &public_key, cache.as_ref()))?;
            (s, a, None)
        }
    };
    tracing::info!(node = %cfg.node_name, %address, public_key = %keys::encode(&public_key), "overlay address");
    netcfg::configure_tun(&cfg.interface, address.into(), cfg.overlay_cidr.into())?;
    if let Some(o6) = cfg.overlay_cidr6 {
        let a6 = evio_store::paired_address6(cfg.overlay_cidr, address, o6)
            .ok_or_else(|| anyhow::anyhow!("no IPv6 VIP for {address} in {o6}"))?;
        netcfg::configure_tun(&cfg.interface, a6.into(), o6.into())?;
        tracing::info!(address6 = %a6, "overlay IPv6 address");
    }
    shared.me.lock().unwrap_or_else(|e| e.into_inner()).address = Some(address);
    ctl::serve(shared.clone(), &cfg.state_dir)?;
    if let Some(addr) = cfg.metrics_addr {
        let local = metrics::serve(shared.clone(), addr)
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        tracing::info!(%local, "metrics");
    }
    tracing::info!(interface = %cfg.interface, mtu, port = cfg.listen_port, queues = cfg.tun_queues, "data plane up");

    // Never routed into the tunnel, whatever etcd says.
    let mut servers = control::etcd_addresses(&cfg.etcd.endpoints);
    servers.extend(stun.iter().map(|s| s.ip()));
    servers.extend(turn.as_ref().map(|t| t.server.ip()));
    let mut control = Control::new(
        cfg.clone(),
        shared.clone(),
        public_key,
        address,
        cache.as_ref().and_then(|c| c.pod_subnet),
        servers,
    );
    if let (Some(ca), Some((cert, signed))) = (ca, cert) {
        control.set_ca_mode(control::CaMode {
            ca,
            private_key: secret_bytes,
            cert,
            signed,
        });
    }
    if store.is_none()
        && let Some(c) = &cache
    {
        control.load_cache(c);
        control.reconcile();
    }
    rt.block_on(async {
        let task = tokio::spawn(control.run(store));
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("stopping");
        shared.stop.store(true, Ordering::Relaxed);
        // Let the control plane revoke the registration (peers drop us at once instead of after the TTL).
        let _ = tokio::time::timeout(Duration::from_secs(3), task).await;
        Ok::<_, anyhow::Error>(())
    })?;
    for t in threads {
        let _ = t.join();
    }
    let _ = std::fs::remove_file(cfg.state_dir.join(ctl::SOCKET));
    Ok(())
}
