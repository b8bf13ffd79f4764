//! Command line and `--config FILE` (a JSON object whose keys are the long flag names, e.g.
//! `{"node-name":"edge-1","etcd-endpoints":"http://10.0.0.1:2379","stun":["203.0.113.1:3478"]}`; flags
//! given on the command line win).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde::Deserialize;

#[derive(Parser, Debug, Default, Deserialize, Clone)]
#[command(
    name = "eviod",
    version,
    about = "evio node agent: host and pod overlay over encrypted tunnels"
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Args {
    /// This node's name (unique in the cluster; the Kubernetes node name).
    #[arg(long, env = "EVIO_NODE_NAME")]
    pub node_name: Option<String>,
    /// etcd client URLs, comma separated.
    #[arg(long, env = "EVIO_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// etcd user (with --etcd-password-file).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password (a trailing newline is ignored).
    #[arg(long)]
    pub etcd_password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify etcd's certificate; enables TLS.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd mutual TLS.
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd mutual TLS.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// Directory for the key, the control socket and cached state (one per agent).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// The host overlay network; the VIP is claimed in it (default 10.10.0.0/16). Given twice, once per
    /// family (`--overlay-cidr 10.10.0.0/16 --overlay-cidr fd00:10:10::/64`): a dual-stack host overlay,
    /// where a node's IPv6 VIP sits at its IPv4 VIP's offset (one claim or certificate grants both).
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub overlay_cidr: Vec<IpNet>,
    /// The cluster's pod CIDR (e.g. 10.244.0.0/16): a peer's pod subnet is routed only if inside it. Without
    /// it, pod subnets are still refused when shorter than /8 or overlapping the overlay, this host's
    /// networks or the etcd/STUN/TURN servers (docs/security.md). Given twice, once per family (the
    /// net-conf's `podCIDRs`): dual-stack pods, a peer's IPv6 subnet being the one at its granted IPv4
    /// subnet's index in the IPv6 pool (never one the peer names).
    #[arg(long)]
    #[serde(default, deserialize_with = "one_or_many")]
    pub pod_cidr: Vec<IpNet>,
    /// Dual-stack pods: the prefix length of the IPv6 node subnets (the net-conf's IPv6
    /// `nodePrefixLength`; default: the IPv6 pod CIDR's plus the IPv4 node bits, as many subnets).
    #[arg(long)]
    pub pod_node_prefix6: Option<u8>,
    /// Ask for this VIP instead of any free one (refused if another node holds it).
    #[arg(long)]
    pub address: Option<Ipv4Addr>,
    /// TUN device name (default evio0).
    #[arg(long)]
    pub interface: Option<String>,
    /// UDP port of the tunnels (default 51820).
    #[arg(long)]
    pub listen_port: Option<u16>,
    /// TUN MTU (default: underlay MTU minus 80).
    #[arg(long)]
    pub mtu: Option<u32>,
    /// TUN queues, each read and sealed by its own thread (default: the CPUs available, at most 4; at
    /// most 16). Flows are spread over the queues by a hash of their addresses and ports; one flow stays
    /// on one queue.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=16))]
    pub tun_queues: Option<u16>,
    /// STUN server (HOST:PORT), for NAT traversal; repeat the flag for several.
    #[arg(long)]
    #[serde(default)]
    pub stun: Vec<String>,
    /// TURN server (HOST:PORT), for relayed paths.
    #[arg(long)]
    pub turn: Option<String>,
    /// TURN user (long-term credentials).
    #[arg(long)]
    pub turn_user: Option<String>,
    /// File holding the TURN password (a trailing newline is ignored; keep it mode 0600).
    #[arg(long)]
    pub turn_password_file: Option<PathBuf>,
    /// Cluster pre-shared key file (base64 of 32 bytes, mode 0600).
    #[arg(long)]
    pub psk_file: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9101).
    #[arg(long)]
    pub metrics_addr: Option<SocketAddr>,
    /// Lease TTL of the node registration in seconds (default 10, at least 2).
    #[arg(long)]
    pub lease_ttl: Option<u64>,
    /// Lazy peers: a peer's connectivity checks and WireGuard session start on the first packet to it
    /// (or its first check to us) and stop after --peer-idle-timeout without traffic; pinned peers
    /// (--pin-peer) are always up. Without it every peer is kept up (checks, session, keepalives).
    #[arg(long, env = "EVIO_LAZY_PEERS")]
    #[serde(default)]
    pub lazy_peers: bool,
    /// A peer (node name) kept up with --lazy-peers, e.g. the control-plane hosts; repeat the flag.
    #[arg(long)]
    #[serde(default)]
    pub pin_peer: Vec<String>,
    /// Seconds without inner packets after which a lazy peer goes idle (default 120, at least 1).
    #[arg(long)]
    pub peer_idle_timeout: Option<u64>,
    /// Read these settings from a JSON file (flags win).
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Join the cluster with this token (`evioctl token create`): it carries etcd, the CA's pin, STUN and
    /// TURN settings. Needed once: what it brings is kept in the state directory. Prefer the environment
    /// variable to the flag (command lines are visible to every user of the host).
    #[arg(long, env = "EVIO_JOIN_TOKEN", hide_env_values = true)]
    #[serde(skip)]
    pub join_token: Option<String>,
}

/// NAT traversal settings, accepted and kept for the NAT traversal module.
#[derive(Debug, Clone, Default)]
pub struct NatConfig {
    pub stun: Vec<String>,
    pub turn: Option<String>,
    pub turn_user: Option<String>,
    pub turn_password_file: Option<PathBuf>,
}

/// Seconds without traffic before a lazy peer goes idle.
pub const DEFAULT_PEER_IDLE_TIMEOUT: u64 = 120;

/// Which peers are kept up (see `--lazy-peers`).
#[derive(Debug, Clone, Default)]
pub struct PeersConfig {
    pub lazy: bool,
    /// Node names always kept up.
    pub pinned: Vec<String>,
    pub idle_timeout: std::time::Duration,
}

/// The default number of TUN queues: one per CPU this process may use (cgroup quotas included), at most
/// four (measured on 2 cores: four TCP streams 1.15x with 2 queues, one stream unchanged;
/// docs/bench/overlay.md).
fn default_tun_queues() -> u16 {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(4) as u16)
}

/// The resolved configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub etcd: evio_store::EtcdOptions,
    pub state_dir: PathBuf,
    pub overlay_cidr: Ipv4Net,
    pub pod_cidr: Option<Ipv4Net>,
    pub pod_cidr6: Option<Ipv6Net>,
    pub pod_node_prefix6: Option<u8>,
    pub overlay_cidr6: Option<Ipv6Net>,
    pub address: Option<Ipv4Addr>,
    pub interface: String,
    pub listen_port: u16,
    pub mtu: Option<u32>,
    pub tun_queues: u16,
    pub nat: NatConfig,
    pub peers: PeersConfig,
    pub psk_file: Option<PathBuf>,
    pub metrics_addr: Option<SocketAddr>,
    pub lease_ttl: u64,
    /// A join token to adopt into the state directory at start (see `trust`).
    pub join_token: Option<String>,
}

impl Config {
    /// The overlay's own networks (host VIPs of both families, IPv6 pods): never underlay addresses.
    pub fn overlay_networks(&self) -> Vec<ipnet::IpNet> {
        let mut v = vec![ipnet::IpNet::V4(self.overlay_cidr)];
        v.extend(self.overlay_cidr6.map(ipnet::IpNet::V6));
        v.extend(self.pod_cidr6.map(ipnet::IpNet::V6));
        v
    }
}

/// At most one network per family from a flag given once or twice.
fn per_family(flag: &str, nets: &[IpNet]) -> Result<(Option<Ipv4Net>, Option<Ipv6Net>)> {
    let (mut v4, mut v6) = (None, None);
    for n in nets {
        match n {
            IpNet::V4(n) if v4.is_none() => v4 = Some(*n),
            IpNet::V6(n) if v6.is_none() => v6 = Some(*n),
            _ => bail!("{flag} given twice for one family: at most one IPv4 and one IPv6 network"),
        }
    }
    Ok((v4, v6))
}

/// A config file's network: one string or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<IpNet>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(IpNet),
        Many(Vec<IpNet>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(n) => vec![n],
        OneOrMany::Many(v) => v,
    })
}

pub const DEFAULT_PORT: u16 = 51820;
/// Lease TTL: a stopped node disappears from its peers within this many seconds.
pub const DEFAULT_LEASE_TTL: u64 = 10;

macro_rules! merge {
    ($a:ident, $f:ident, $($field:ident),*) => { $( if $a.$field.is_none() { $a.$field = $f.$field.clone(); } )* };
}

impl Args {
    pub fn resolve(mut self) -> Result<Config> {
        if let Some(path) = &self.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let f: Args = serde_json::from_str(&text)
                .with_context(|| format!("invalid config file {}", path.display()))?;
            merge!(
                self,
                f,
                node_name,
                etcd_endpoints,
                etcd_user,
                etcd_password_file,
                etcd_ca,
                etcd_cert,
                etcd_key,
                state_dir,
                pod_node_prefix6,
                address,
                interface,
                listen_port,
                mtu,
                tun_queues,
                turn,
                turn_user,
                turn_password_file,
                psk_file,
                metrics_addr,
                lease_ttl
            );
            if self.stun.is_empty() {
                self.stun = f.stun.clone();
            }
            if self.overlay_cidr.is_empty() {
                self.overlay_cidr = f.overlay_cidr.clone();
            }
            if self.pod_cidr.is_empty() {
                self.pod_cidr = f.pod_cidr.clone();
            }
            if self.pin_peer.is_empty() {
                self.pin_peer = f.pin_peer.clone();
            }
            self.lazy_peers |= f.lazy_peers;
            if self.peer_idle_timeout.is_none() {
                self.peer_idle_timeout = f.peer_idle_timeout;
            }
        }
        let Some(node_name) = self.node_name else {
            bail!("--node-name is required")
        };
        // With a join token (now or adopted earlier into the state dir) the endpoints come from it.
        let endpoints = self.etcd_endpoints.unwrap_or_default();
        let Some(state_dir) = self.state_dir else {
            bail!("--state-dir is required")
        };
        let (overlay_cidr, overlay_cidr6) = per_family("--overlay-cidr", &self.overlay_cidr)?;
        let overlay_cidr = overlay_cidr
            .unwrap_or_else(|| "10.10.0.0/16".parse().expect("valid"))
            .trunc();
        if overlay_cidr.prefix_len() > 30 {
            bail!("--overlay-cidr {overlay_cidr} is too small");
        }
        let (pod_cidr, pod_cidr6) = per_family("--pod-cidr", &self.pod_cidr)?;
        let pod_cidr = pod_cidr.map(|p| p.trunc());
        if let Some(p) = pod_cidr
            && (p.contains(&overlay_cidr.network()) || overlay_cidr.contains(&p.network()))
        {
            bail!("--pod-cidr {p} overlaps --overlay-cidr {overlay_cidr}");
        }
        let pod_cidr6 = pod_cidr6.map(|p| p.trunc());
        if let Some(p) = pod_cidr6 {
            if pod_cidr.is_none() {
                bail!(
                    "--pod-cidr {p} needs an IPv4 --pod-cidr too (the IPv6 subnets pair with the IPv4 ones)"
                );
            }
            if p.prefix_len() > 112 || p.addr().is_loopback() || p.addr().is_multicast() {
                bail!("--pod-cidr {p} is not a usable IPv6 pod pool (a unicast /112 or larger)");
            }
            if let Some(n) = self.pod_node_prefix6
                && (n <= p.prefix_len() || u32::from(n) > evio_store::MAX_PREFIX6)
            {
                bail!(
                    "--pod-node-prefix6 {n}: want more than /{} and at most /120",
                    p.prefix_len()
                );
            }
        }
        let overlay_cidr6 = overlay_cidr6.map(|p| p.trunc());
        if let Some(o6) = overlay_cidr6 {
            let bits6 = 128 - u32::from(o6.prefix_len());
            if bits6 < 32 - u32::from(overlay_cidr.prefix_len()) {
                bail!(
                    "--overlay-cidr {o6} is smaller than --overlay-cidr {overlay_cidr} (every IPv4 VIP's \
                     offset must fit)"
                );
            }
            if o6.addr().is_loopback() || o6.addr().is_multicast() {
                bail!("--overlay-cidr {o6} is not a unicast range");
            }
            if let Some(p) = pod_cidr6
                && (p.contains(&o6.network()) || o6.contains(&p.network()))
            {
                bail!("--pod-cidr {p} overlaps --overlay-cidr {o6}");
            }
        }
        if let Some(a) = self.address
            && !overlay_cidr.contains(&a)
        {
            bail!("--address {a} is not inside --overlay-cidr {overlay_cidr}");
        }
        if self.turn.is_some() != self.turn_user.is_some()
            || self.turn_user.is_some() != self.turn_password_file.is_some()
        {
            bail!("--turn needs --turn-user and --turn-password-file");
        }
        let mut etcd =
            evio_store::EtcdOptions::new(evio_store::EtcdOptions::split_endpoints(&endpoints));
        etcd.user = self.etcd_user;
        etcd.password_file = self.etcd_password_file;
        etcd.ca = self.etcd_ca;
        etcd.cert = self.etcd_cert;
        etcd.key = self.etcd_key;
        etcd.timeout = std::time::Duration::from_secs(3);
        let interface = self.interface.unwrap_or_else(|| "evio0".into());
        if interface.is_empty() || interface.len() > 15 || interface.contains('/') {
            bail!("--interface {interface:?} is not a valid interface name");
        }
        let lease_ttl = self.lease_ttl.unwrap_or(DEFAULT_LEASE_TTL);
        if lease_ttl < 2 {
            bail!("--lease-ttl {lease_ttl} is too short: at least 2 seconds (renewed every TTL/3)");
        }
        let idle = self.peer_idle_timeout.unwrap_or(DEFAULT_PEER_IDLE_TIMEOUT);
        if idle == 0 {
            bail!("--peer-idle-timeout must be at least 1 second");
        }
        Ok(Config {
            peers: PeersConfig {
                lazy: self.lazy_peers,
                pinned: self.pin_peer,
                idle_timeout: std::time::Duration::from_secs(idle),
            },
            node_name,
            etcd,
            state_dir,
            overlay_cidr,
            pod_cidr,
            pod_cidr6,
            pod_node_prefix6: self.pod_node_prefix6,
            overlay_cidr6,
            address: self.address,
            interface,
            listen_port: self.listen_port.unwrap_or(DEFAULT_PORT),
            mtu: self.mtu,
            tun_queues: match self.tun_queues.unwrap_or_else(default_tun_queues) {
                n @ 1..=16 => n,
                n => bail!("tun-queues {n}: want 1 to 16"),
            },
            nat: NatConfig {
                stun: self.stun,
                turn: self.turn,
                turn_user: self.turn_user,
                turn_password_file: self.turn_password_file,
            },
            psk_file: self.psk_file,
            metrics_addr: self.metrics_addr,
            lease_ttl,
            join_token: self.join_token,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_file_fills_what_flags_leave_out() {
        let d = std::env::temp_dir().join(format!("eviod-cfg-{}", std::process::id()));
        std::fs::write(
            &d,
            r#"{"node-name":"file","etcd-endpoints":"http://127.0.0.1:1","state-dir":"/tmp/x","listen-port":4000,"stun":["192.0.2.1:3478"]}"#,
        )
        .unwrap();
        let a = Args::parse_from([
            "eviod",
            "--config",
            d.to_str().unwrap(),
            "--node-name",
            "flag",
        ]);
        let c = a.resolve().unwrap();
        assert_eq!(c.node_name, "flag");
        assert_eq!(c.listen_port, 4000);
        assert_eq!(c.nat.stun, vec!["192.0.2.1:3478".to_string()]);
        assert_eq!(c.overlay_cidr.to_string(), "10.10.0.0/16");
        assert_eq!(c.lease_ttl, DEFAULT_LEASE_TTL);
        std::fs::write(&d, r#"{"node-nme":"typo"}"#).unwrap();
        assert!(
            Args::parse_from(["eviod", "--config", d.to_str().unwrap()])
                .resolve()
                .is_err()
        );
        std::fs::remove_file(&d).unwrap();
    }

    /// The required flags plus `extra`, resolved.
    fn resolve_with(extra: &[&str]) -> anyhow::Result<Config> {
        let required = [
            "eviod",
            "--node-name",
            "n",
            "--etcd-endpoints",
            "x",
            "--state-dir",
            "/tmp",
        ];
        Args::parse_from(required.iter().chain(extra)).resolve()
    }

    #[test]
    fn lease_ttl_below_two_seconds_is_refused() {
        for ttl in ["0", "1"] {
            let e = resolve_with(&["--lease-ttl", ttl]).unwrap_err().to_string();
            assert!(e.contains("--lease-ttl"), "{e}");
        }
        assert_eq!(resolve_with(&["--lease-ttl", "2"]).unwrap().lease_ttl, 2);
    }

    #[test]
    fn pod_cidr_is_optional_and_must_not_overlap_the_overlay() {
        assert_eq!(resolve_with(&[]).unwrap().pod_cidr, None);
        let c = resolve_with(&["--pod-cidr", "10.244.1.0/16"]).unwrap();
        assert_eq!(c.pod_cidr, Some("10.244.0.0/16".parse().unwrap()));
        let e = resolve_with(&["--pod-cidr", "10.0.0.0/8"]).unwrap_err();
        assert!(e.to_string().contains("overlaps"), "{e}");
    }

    #[test]
    fn ipv6_ranges_are_checked() {
        let c = resolve_with(&[
            "--pod-cidr",
            "10.244.0.0/16",
            "--pod-cidr",
            "fd00:10:244::/48",
            "--overlay-cidr",
            "fd00:10:10::/64",
        ])
        .unwrap();
        assert_eq!(
            c.overlay_cidr.to_string(),
            "10.10.0.0/16",
            "the IPv4 default stays"
        );
        assert_eq!(c.pod_cidr6, Some("fd00:10:244::/48".parse().unwrap()));
        assert_eq!(c.overlay_cidr6, Some("fd00:10:10::/64".parse().unwrap()));
        assert_eq!(c.overlay_networks().len(), 3);
        for (args, what) in [
            (&["--pod-cidr", "fd00:10:244::/48"][..], "needs an IPv4"),
            (&["--overlay-cidr", "fd00:10:10::/120"][..], "smaller than"),
            (
                &[
                    "--overlay-cidr",
                    "10.10.0.0/16",
                    "--overlay-cidr",
                    "10.11.0.0/16",
                ][..],
                "twice",
            ),
            (
                &[
                    "--pod-cidr",
                    "10.244.0.0/16",
                    "--pod-cidr",
                    "fd00::/16",
                    "--overlay-cidr",
                    "fd00:10:10::/64",
                ][..],
                "overlaps",
            ),
            (
                &[
                    "--pod-cidr",
                    "10.244.0.0/16",
                    "--pod-cidr",
                    "fd00::/48",
                    "--pod-node-prefix6",
                    "48",
                ][..],
                "--pod-node-prefix6",
            ),
        ] {
            let e = resolve_with(args).unwrap_err().to_string();
            assert!(e.contains(what), "{args:?}: {e}");
        }
    }

    #[test]
    fn a_config_file_gives_networks_as_one_string_or_a_list() {
        let one: Args = serde_json::from_str(r#"{"overlay-cidr":"10.10.0.0/16"}"#).unwrap();
        assert_eq!(one.overlay_cidr.len(), 1);
        let two: Args =
            serde_json::from_str(r#"{"pod-cidr":["10.244.0.0/16","fd00:10:244::/48"]}"#).unwrap();
        assert_eq!(two.pod_cidr.len(), 2);
    }

    #[test]
    fn address_must_be_in_the_overlay() {
        let e = resolve_with(&["--address", "10.11.0.1"]).unwrap_err();
        assert!(e.to_string().contains("not inside"));
    }
}
