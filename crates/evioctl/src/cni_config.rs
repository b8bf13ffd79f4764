//! `evioctl cni-config`: claim this node's pod subnet in etcd, write the node's conflist atomically and
//! install the evio-cni plugin. Runs as the init container of the evio DaemonSet (see docs/deploy.md).
//!
//! Order matters for "nothing written on failure": the net-conf, node name, directories and plugin binary
//! are checked first, then the subnet is claimed (one etcd transaction), and only then are files written.
//! A claimer killed at any moment leaves either no claim or a whole one, and a re-run gets the same claim.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use evio_cni_types::config::{ConfList, PluginKeys};
use evio_cni_types::version::LATEST;
use evio_store::{
    EtcdOptions, NodeSubnet, Store, SubnetPlan, SubnetPlan6, gateway6, node_bits_from_json,
    parse_cidr,
};
use serde_json::{Map, Value, json};

mod version;

/// The conflist file this command owns.
pub use evio_cni_types::config::CONFLIST;
/// The plugin's binary name (the conflist's `"type": "evio-cni"`).
pub const PLUGIN: &str = "evio-cni";
/// Pod MTU when the net-conf names none: the tunnel's inner MTU on a 1500-byte underlay (one rule, in
/// evio-cni-types, derived from the tunnel's overhead).
pub const DEFAULT_MTU: u32 = evio_cni_types::config::DEFAULT_MTU;

/// etcd connection flags shared by `cni-config`, `nodes` and `release`.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (cni-config: defaults to the net-conf's `dataStore`).
    #[arg(long, env = "EVIO_ETCD_ENDPOINTS")]
    pub etcd_endpoints: Option<String>,
    /// etcd user (etcd auth enabled).
    #[arg(long)]
    pub etcd_user: Option<String>,
    /// File holding the etcd user's password.
    #[arg(long)]
    pub etcd_password_file: Option<PathBuf>,
    /// CA bundle (PEM) to verify etcd's certificate (enables TLS).
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM) for etcd mutual TLS.
    #[arg(long)]
    pub etcd_cert: Option<PathBuf>,
    /// Client key (PEM) for etcd mutual TLS.
    #[arg(long)]
    pub etcd_key: Option<PathBuf>,
    /// Seconds to wait for etcd (connecting and each request) before giving up.
    #[arg(long, default_value_t = 5.0)]
    pub etcd_timeout: f64,
}

impl EtcdArgs {
    /// The store options; `net_conf` is the net-conf of `cni-config`, whose `dataStore` is the fallback
    /// (flags win). The other subcommands have no net-conf.
    pub fn options(&self, net_conf: Option<&NetConf>) -> Result<EtcdOptions> {
        let endpoints = match (&self.etcd_endpoints, net_conf) {
            (Some(list), _) => EtcdOptions::split_endpoints(list),
            (None, Some(conf)) => conf.data_store.clone().unwrap_or_default(),
            (None, None) => Vec::new(),
        };
        if endpoints.is_empty() {
            let or = if net_conf.is_some() {
                " (or dataStore in the net-conf)"
            } else {
                ""
            };
            bail!("no etcd endpoints: give --etcd-endpoints{or}");
        }
        if !(self.etcd_timeout.is_finite()
            && self.etcd_timeout > 0.0
            && self.etcd_timeout <= 3600.0)
        {
            bail!("--etcd-timeout must be a number of seconds between 0 and 3600");
        }
        let mut o = EtcdOptions::new(endpoints);
        o.user = self.etcd_user.clone();
        o.password_file = self.etcd_password_file.clone();
        o.ca = self.etcd_ca.clone();
        o.cert = self.etcd_cert.clone();
        o.key = self.etcd_key.clone();
        o.timeout = Duration::from_secs_f64(self.etcd_timeout);
        Ok(o)
    }
}

/// A single-threaded runtime for the CLI's few requests.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

#[derive(clap::Args)]
pub struct Args {
    /// The network configuration (JSON): podCIDR, nodeBits, dataStore, plugin keys.
    #[arg(long)]
    pub net_conf: PathBuf,
    /// This node's name (as Kubernetes knows it).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Where the conflist goes.
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Where CNI plugin binaries live (evio-cni is installed here).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// The evio-cni binary to install (default: `evio-cni` next to this executable).
    #[arg(long)]
    pub plugin_binary: Option<PathBuf>,
    /// Where the runtime finds the chained plugins (portmap, host-local), colon-separated; they are asked
    /// which CNI versions they speak. Default: --cni-bin-dir.
    #[arg(long)]
    pub cni_path: Option<String>,
}

/// The parsed and checked net-conf.
#[derive(Debug)]
pub struct NetConf {
    pub name: String,
    /// The cniVersion the net-conf names, if any. The conflist's version is chosen by [`version::choose`]:
    /// this one if every plugin of the chain speaks it, else the newest they all speak up to 1.0.0.
    pub cni_version: Option<String>,
    pub plan: SubnetPlan,
    /// Dual-stack pods: the IPv6 pool of `podCIDRs` with its node prefix length; a node's IPv6 subnet is
    /// the one paired with its IPv4 claim ([`SubnetPlan6::paired`]).
    pub plan6: Option<SubnetPlan6>,
    pub data_store: Option<Vec<String>>,
    /// The evio-cni plugin keys copied into the conflist: [`PluginKeys`] serialised (checked by the plugin's
    /// parser).
    pub plugin: Map<String, Value>,
    /// Extra host-local keys (e.g. `dataDir`), from the net-conf's optional `ipam` object.
    pub ipam_extra: Map<String, Value>,
}

/// The pod pools: `podCIDR` and `nodeBits` (the original Evio keys), and/or `podCIDRs` (dual-stack: one
/// IPv4 and one IPv6 pool, each a CIDR string or `{"cidr": ..., "nodePrefixLength": N}`). The IPv4 pool
/// is required (claims are IPv4 subnets; a node's IPv6 subnet is the one at its IPv4 subnet's index); the
/// IPv6 pool's node prefix defaults to as many subnets as the IPv4 pool has, and must give at least as
/// many.
fn pod_plans(o: &Map<String, Value>) -> Result<(SubnetPlan, Option<SubnetPlan6>)> {
    type Pool = Option<(String, Option<u8>)>;
    let mut v4: Pool = match o.get("podCIDR") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some((s.clone(), None)),
        Some(other) => bail!("podCIDR must be a string like \"10.244.0.0/16\", not {other}"),
    };
    let mut v6: Pool = None;
    match o.get("podCIDRs") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for e in list {
                let (cidr, npl) = match e {
                    Value::String(s) => (s.clone(), None),
                    Value::Object(m) => {
                        let cidr = m.get("cidr").and_then(Value::as_str).ok_or_else(|| {
                            anyhow!("podCIDRs: an entry {e} has no \"cidr\" string")
                        })?;
                        let npl = match m.get("nodePrefixLength") {
                            None => None,
                            Some(n) => Some(n.as_u64().filter(|n| *n <= 128).ok_or_else(|| {
                                anyhow!("podCIDRs: nodePrefixLength {n} is not a prefix length")
                            })? as u8),
                        };
                        (cidr.to_string(), npl)
                    }
                    other => bail!("podCIDRs entries are CIDR strings or objects, not {other}"),
                };
                let is_v6 = cidr.contains(':');
                let slot = if is_v6 { &mut v6 } else { &mut v4 };
                match slot {
                    Some((given, _)) if is_v6 || given.trim() != cidr.trim() => bail!(
                        "podCIDRs: at most one IPv4 and one IPv6 pool (podCIDR, if also given, is the \
                         IPv4 one)"
                    ),
                    _ => *slot = Some((cidr, npl)),
                }
            }
        }
        Some(other) => bail!(
            "podCIDRs must be a list like [\"10.244.0.0/16\", \"fd00:10:244::/48\"], not {other}"
        ),
    }
    let Some((cidr, npl4)) = v4 else {
        bail!(
            "the net-conf has no podCIDR, an IPv4 pod pool (e.g. \"podCIDR\": \"10.244.0.0/16\"; \
             dual-stack: \"podCIDRs\": [\"10.244.0.0/16\", \"fd00:10:244::/48\"])"
        )
    };
    let pool = parse_cidr(&cidr).map_err(|e| anyhow!("podCIDR: {e}"))?;
    let bits_key = match o.get("nodeBits") {
        Some(v) => Some(node_bits_from_json(v).map_err(|e| anyhow!("{e}"))?),
        None => None,
    };
    let bits = match npl4 {
        Some(n) => {
            let from_prefix = n
                .checked_sub(pool.prefix_len())
                .ok_or_else(|| anyhow!("podCIDRs: nodePrefixLength /{n} is shorter than {pool}"))?;
            if bits_key.is_some_and(|b| b != from_prefix) {
                bail!("nodeBits and the IPv4 nodePrefixLength disagree");
            }
            from_prefix
        }
        None => bits_key.unwrap_or(8),
    };
    let plan = SubnetPlan::new(pool, bits).map_err(|e| anyhow!("{e}"))?;
    let Some((cidr6, npl6)) = v6 else {
        return Ok((plan, None));
    };
    let pool6 = SubnetPlan6::parse(&cidr6, 0)
        .map_err(|e| anyhow!("podCIDRs: {e}"))?
        .pool();
    let bits6 = match npl6 {
        Some(n) => n
            .checked_sub(pool6.prefix_len())
            .ok_or_else(|| anyhow!("podCIDRs: nodePrefixLength /{n} is shorter than {pool6}"))?,
        None => bits,
    };
    let plan6 = SubnetPlan6::new(pool6, bits6).map_err(|e| anyhow!("podCIDRs: {e}"))?;
    if !plan6.holds(&plan) {
        bail!(
            "podCIDRs: {} cut into /{} has fewer node subnets than {} cut into /{} (every node's IPv4 \
             subnet needs its IPv6 pair)",
            plan6.pool(),
            plan6.node_prefix(),
            plan.pool(),
            plan.node_prefix()
        );
    }
    Ok((plan, Some(plan6)))
}

/// The versions evio-cni speaks.
const CNI_VERSIONS: &[&str] = evio_cni_types::version::SUPPORTED;

impl NetConf {
    /// Parses and checks a net-conf document; every error names the key and what is wrong.
    pub fn parse(text: &str) -> Result<NetConf> {
        let v: Value = serde_json::from_str(text).context("the net-conf is not valid JSON")?;
        let Value::Object(o) = v else {
            bail!("the net-conf must be a JSON object")
        };
        let (plan, plan6) = pod_plans(&o)?;
        let name = match o.get("name") {
            None => "evio".to_string(),
            Some(Value::String(s)) if valid_net_name(s) => s.clone(),
            Some(other) => bail!(
                "name {other} is not a valid CNI network name (letters, digits, '.', '-', '_')"
            ),
        };
        let data_store = match o.get("dataStore") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(EtcdOptions::split_endpoints(s)),
            Some(Value::Array(a)) => Some(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("dataStore entries must be strings"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(other) => {
                bail!("dataStore must be a comma-separated string or a list of URLs, not {other}")
            }
        };
        let cni_version = match o.get("cniVersion") {
            None => None,
            Some(Value::String(s)) if CNI_VERSIONS.contains(&s.as_str()) => Some(s.clone()),
            Some(other) => bail!(
                "cniVersion {other} is not one of {}",
                CNI_VERSIONS.join(", ")
            ),
        };
        // The plugin keys, read and checked by evio-cni-types: the rules the plugin itself runs.
        let plugin = PluginKeys::from_object(&o)
            .map_err(|e| anyhow!("{e}"))?
            .to_map();
        let mut ipam_extra = Map::new();
        match o.get("ipam") {
            None | Some(Value::Null) => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    match k.as_str() {
                        "type" if v != "host-local" => {
                            bail!("ipam.type: only host-local is supported, not {v}")
                        }
                        "type" | "ranges" | "subnet" | "rangeStart" | "rangeEnd" | "gateway" => {}
                        _ => {
                            ipam_extra.insert(k.clone(), v.clone());
                        }
                    }
                }
            }
            Some(other) => bail!("ipam must be an object, not {other}"),
        }
        let conf = NetConf {
            name,
            cni_version,
            plan,
            plan6,
            data_store,
            plugin,
            ipam_extra,
        };
        // The whole plugin entry, as a node would get it, through the plugin's own parser.
        let sample = conf
            .plan
            .subnet(0)
            .ok_or_else(|| anyhow!("podCIDR has no node subnet"))?;
        let version = conf.cni_version.as_deref().unwrap_or(LATEST);
        check_conflist(&conf.conflist(&sample, version))?;
        Ok(conf)
    }

    /// The node's conflist for `subnet`, of CNI version `cni_version`.
    pub fn conflist(&self, subnet: &NodeSubnet, cni_version: &str) -> Value {
        let mut plugin = Map::new();
        plugin.insert("type".into(), json!(PLUGIN));
        plugin.extend(self.plugin.clone());
        plugin.entry("mtu").or_insert(json!(DEFAULT_MTU));
        // Pod to pod traffic across nodes stays unmasqueraded: the plugin exempts podCIDR from ipMasq
        // (and the IPv6 pool, as one of the clusterCIDRs).
        plugin.insert("podCIDR".into(), json!(self.plan.pool().to_string()));
        let subnet6 = self
            .plan6
            .and_then(|p| Some((p.pool(), p.paired(&self.plan, &subnet.subnet)?)));
        if let Some((pool6, _)) = subnet6 {
            let mut cidrs = match plugin.get("clusterCIDRs") {
                Some(Value::Array(a)) => a.clone(),
                _ => Vec::new(),
            };
            cidrs.push(json!(pool6.to_string()));
            plugin.insert("clusterCIDRs".into(), Value::Array(cidrs));
        }
        let mut ipam = Map::new();
        ipam.insert("type".into(), json!("host-local"));
        let mut ranges = vec![json!([{
            "subnet": subnet.subnet.to_string(),
            "rangeStart": subnet.range_start.to_string(),
            "rangeEnd": subnet.range_end.to_string(),
            "gateway": subnet.gateway.to_string(),
        }])];
        if let Some((_, s6)) = subnet6 {
            ranges.push(json!([{
                "subnet": s6.to_string(),
                "gateway": gateway6(&s6).to_string(),
            }]));
        }
        ipam.insert("ranges".into(), Value::Array(ranges));
        // Without a default route through the bridge, pods still need the pod CIDR through it.
        if self.plugin.get("isDefaultGateway") == Some(&Value::Bool(false))
            && !self.ipam_extra.contains_key("routes")
        {
            let mut routes = vec![json!({ "dst": self.plan.pool().to_string() })];
            if let Some((pool6, _)) = subnet6 {
                routes.push(json!({ "dst": pool6.to_string() }));
            }
            ipam.insert("routes".into(), Value::Array(routes));
        }
        ipam.extend(self.ipam_extra.clone());
        plugin.insert("ipam".into(), Value::Object(ipam));
        json!({
            "cniVersion": cni_version,
            "name": self.name,
            "plugins": [
                Value::Object(plugin),
                { "type": "portmap", "capabilities": { "portMappings": true } },
            ],
        })
    }
}

fn valid_net_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
}

/// Checks a conflist with the parsers the runtime's side uses: the list, then the evio-cni entry with
/// [`PluginKeys::check_entry`] (i.e. the plugin's `NetConf::parse`), so nothing the plugin would refuse is
/// ever written.
pub fn check_conflist(list: &Value) -> Result<()> {
    let bytes = serde_json::to_vec(list)?;
    let l = ConfList::parse(&bytes).map_err(|e| anyhow!("the conflist: {e}"))?;
    let Some(Value::Object(entry)) = l.plugins.first() else {
        bail!("the conflist has no {PLUGIN} entry");
    };
    PluginKeys::check_entry(entry, &l.cni_version, &l.name).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

pub fn run(args: Args) -> Result<()> {
    // 1. Everything that can be checked without etcd.
    let text = fs::read_to_string(&args.net_conf)
        .with_context(|| format!("cannot read the net-conf {}", args.net_conf.display()))?;
    let conf = NetConf::parse(&text)
        .with_context(|| format!("bad net-conf {}", args.net_conf.display()))?;
    if !evio_store::keys::valid_node_name(&args.node_name) {
        bail!("invalid node name {:?}", args.node_name);
    }
    let opts = args.etcd.options(Some(&conf))?;
    let plugin = match &args.plugin_binary {
        Some(p) => p.clone(),
        None => std::env::current_exe()
            .context("cannot find this executable")?
            .parent()
            .map(|d| d.join(PLUGIN))
            .ok_or_else(|| anyhow!("cannot find this executable's directory"))?,
    };
    let meta = fs::metadata(&plugin).with_context(|| {
        format!(
            "the {PLUGIN} binary {} is missing (use --plugin-binary)",
            plugin.display()
        )
    })?;
    if !meta.is_file() {
        bail!("the {PLUGIN} binary {} is not a file", plugin.display());
    }
    let search: Vec<PathBuf> = match &args.cni_path {
        Some(p) => p
            .split(':')
            .filter(|d| !d.is_empty())
            .map(PathBuf::from)
            .collect(),
        None => vec![args.cni_bin_dir.clone()],
    };
    let chain = [
        version::ask(PLUGIN, Some(&plugin), &search)?,
        version::ask("portmap", None, &search)?,
    ];
    let cni_version = version::choose(conf.cni_version.as_deref(), &chain)?;

    // 2. The claim (one etcd transaction).
    let claim = runtime()?.block_on(async {
        let store = Store::connect(&opts).await?;
        store.claim_subnet(&conf.plan, &args.node_name).await
    })?;
    let subnet = NodeSubnet::of(claim.subnet)?;

    // 3. Files: conflist, stale configs, plugin.
    for d in [&args.cni_conf_dir, &args.cni_bin_dir] {
        fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
    }
    let list = conf.conflist(&subnet, &cni_version);
    check_conflist(&list)?;
    let conflist = serde_json::to_vec_pretty(&list)?;
    write_atomic(&args.cni_conf_dir, CONFLIST, &conflist, 0o644)?;
    remove_stale(&args.cni_conf_dir)?;
    install_plugin(&plugin, &args.cni_bin_dir)?;
    for needed in ["host-local", "portmap"] {
        if !search.iter().any(|d| d.join(needed).exists()) {
            eprintln!(
                "evioctl: warning: the {needed} CNI plugin is not in {}; pods on this node will fail to start \
                 until it is installed there (containernetworking-plugins)",
                std::env::join_paths(&search)
                    .map(|p| p.to_string_lossy().into_owned())
                    .unwrap_or_default()
            );
        }
    }
    println!(
        "{}",
        json!({
            "node": args.node_name,
            "subnet": subnet.subnet.to_string(),
            "gateway": subnet.gateway.to_string(),
            "rangeStart": subnet.range_start.to_string(),
            "rangeEnd": subnet.range_end.to_string(),
            "cniVersion": cni_version,
        })
    );
    Ok(())
}

/// Prefix of our temporary files (hidden, and not ending in .conf/.conflist/.json, so runtimes skip them).
const TMP_PREFIX: &str = ".evio-tmp-";

/// Writes `dir/name` atomically: a temp file in the same directory, fsync, rename over, fsync the directory.
pub fn write_atomic(dir: &Path, name: &str, data: &[u8], mode: u32) -> Result<()> {
    let tmp = dir.join(format!("{TMP_PREFIX}{}-{name}", std::process::id()));
    let res = (|| -> Result<()> {
        let mut f =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(data)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, dir.join(name))
            .with_context(|| format!("cannot rename into {}", dir.join(name).display()))?;
        File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if res.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    res
}

/// Installs the plugin binary as `bin_dir/evio-cni`: copied to a temp name and renamed over, so a running
/// plugin is never overwritten in place. Skipped when the installed file is already identical.
fn install_plugin(src: &Path, bin_dir: &Path) -> Result<()> {
    let data = fs::read(src).with_context(|| format!("cannot read {}", src.display()))?;
    let dst = bin_dir.join(PLUGIN);
    if fs::read(&dst).map(|old| old == data).unwrap_or(false) {
        return Ok(());
    }
    write_atomic(bin_dir, PLUGIN, &data, 0o755)
        .with_context(|| format!("cannot install {}", dst.display()))
}

/// Removes evio configs under other names (from older versions or another `name`) and temp files left by
/// killed runs. A file is ours when it is a CNI config whose plugin list holds an `evio-cni` plugin.
fn remove_stale(dir: &Path) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == CONFLIST || !entry.file_type()?.is_file() {
            continue;
        }
        if let Some(rest) = name.strip_prefix(TMP_PREFIX) {
            let pid: Option<i32> = rest.split('-').next().and_then(|p| p.parse().ok());
            let alive = pid.is_some_and(|p| {
                p as u32 == std::process::id() || Path::new(&format!("/proc/{p}")).exists()
            });
            if !alive {
                let _ = fs::remove_file(entry.path());
            }
            continue;
        }
        if !(name.ends_with(".conflist") || name.ends_with(".conf") || name.ends_with(".json")) {
            continue;
        }
        let Ok(v) = fs::read(entry.path())
            .map_err(|_| ())
            .and_then(|b| serde_json::from_slice::<Value>(&b).map_err(|_| ()))
        else {
            continue;
        };
        let is_evio = |p: &Value| p.get("type").and_then(Value::as_str) == Some(PLUGIN);
        let ours = is_evio(&v)
            || v.get("plugins")
                .and_then(Value::as_array)
                .is_some_and(|ps| ps.iter().any(is_evio));
        if ours {
            eprintln!(
                "evioctl: removing stale evio CNI config {}",
                entry.path().display()
            );
            fs::remove_file(entry.path())
                .with_context(|| format!("cannot remove {}", entry.path().display()))?;
        }
    }
    File::open(dir)?.sync_all()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dual_stack_net_conf_gives_both_ranges() {
        let c = NetConf::parse(
            r#"{"podCIDRs":["10.244.0.0/16","fd00:10:244::/48"],"nodeBits":8,
                "clusterCIDRs":["10.96.0.0/12"]}"#,
        )
        .unwrap();
        let l = c.conflist(&c.plan.subnet(7).unwrap(), "1.0.0");
        let p = &l["plugins"][0];
        assert_eq!(p["ipam"]["ranges"][0][0]["subnet"], "10.244.7.0/24");
        assert_eq!(p["ipam"]["ranges"][1][0]["subnet"], "fd00:10:244:700::/56");
        assert_eq!(p["ipam"]["ranges"][1][0]["gateway"], "fd00:10:244:700::1");
        // Pod to pod over IPv6 is not masqueraded either.
        assert_eq!(
            p["clusterCIDRs"],
            json!(["10.96.0.0/12", "fd00:10:244::/48"])
        );
        check_conflist(&l).unwrap();
        // Each pool with its node prefix length: /24s and /64s.
        let c = NetConf::parse(
            r#"{"podCIDRs":[{"cidr":"10.244.0.0/16","nodePrefixLength":24},
                            {"cidr":"fd00:10:244::/48","nodePrefixLength":64}]}"#,
        )
        .unwrap();
        let l = c.conflist(&c.plan.subnet(7).unwrap(), "1.0.0");
        assert_eq!(
            l["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd00:10:244:7::/64"
        );
        for (conf, what) in [
            (r#"{"podCIDRs":["fd00:10:244::/48"]}"#, "no podCIDR"),
            (
                r#"{"podCIDRs":["10.244.0.0/16","10.245.0.0/16"]}"#,
                "at most one IPv4",
            ),
            (
                r#"{"podCIDR":"10.244.0.0/16","podCIDRs":["fd00::/48","fd01::/48"]}"#,
                "at most one",
            ),
            (
                r#"{"podCIDRs":["10.244.0.0/16","fd00::/116"]}"#,
                "at most /120",
            ),
            (
                r#"{"podCIDRs":["10.244.0.0/16",{"cidr":"fd00::/56","nodePrefixLength":60}]}"#,
                "fewer node subnets",
            ),
            (
                r#"{"podCIDRs":[{"cidr":"10.244.0.0/16","nodePrefixLength":24}],"nodeBits":6}"#,
                "disagree",
            ),
            (r#"{"podCIDRs":"10.244.0.0/16"}"#, "must be a list"),
        ] {
            let e = format!("{:#}", NetConf::parse(conf).unwrap_err());
            assert!(e.contains(what), "{conf}: {e}");
        }
    }

    #[test]
    fn net_conf_parsing() {
        let c = NetConf::parse(
            r#"{"podCIDR":"10.244.0.0/16","nodeBits":"8","dataStore":"http://a:2379, http://b:2379",
                "bridgeType":"OVS","isIPMasq":"true","mtu":"1400","unknownKey":1}"#,
        )
        .unwrap();
        assert_eq!(c.plan.len(), 256);
        assert_eq!(
            c.data_store.as_deref(),
            Some(&["http://a:2379".to_string(), "http://b:2379".to_string()][..])
        );
        assert_eq!(c.plugin["ipMasq"], json!(true));
        assert_eq!(c.plugin["mtu"], json!(1400));
        assert!(!c.plugin.contains_key("unknownKey"));
        let s = c.plan.subnet(3).unwrap();
        assert_eq!(c.cni_version, None);
        let l = c.conflist(&s, "1.0.0");
        assert_eq!(l["cniVersion"], "1.0.0");
        assert_eq!(l["plugins"][0]["type"], "evio-cni");
        assert_eq!(l["plugins"][0]["bridgeType"], "OVS");
        assert_eq!(
            l["plugins"][0]["ipam"]["ranges"][0][0]["gateway"],
            "10.244.3.1"
        );
        assert_eq!(
            l["plugins"][0]["ipam"]["ranges"][0][0]["rangeEnd"],
            "10.244.3.254"
        );
        assert_eq!(l["plugins"][1]["type"], "portmap");
        let d = NetConf::parse(r#"{"podCIDR":"10.244.0.0/16"}"#).unwrap();
        assert_eq!(d.conflist(&s, "1.0.0")["plugins"][0]["mtu"], 1420);
    }

    #[test]
    fn net_conf_errors_name_the_problem() {
        for (text, want) in [
            ("{", "not valid JSON"),
            ("[]", "JSON object"),
            (r#"{"nodeBits":8}"#, "no podCIDR"),
            (r#"{"podCIDR":"10.244.1.0/16"}"#, "host bits"),
            (r#"{"podCIDR":"10.244.0.0/16","nodeBits":"x"}"#, "nodeBits"),
            (
                r#"{"podCIDR":"10.244.0.0/24","nodeBits":8}"#,
                "fewer than 2 host bits",
            ),
            (
                r#"{"podCIDR":"10.244.0.0/16","bridgeType":"vxlan"}"#,
                "bridgeType",
            ),
            (r#"{"podCIDR":"10.244.0.0/16","mtu":10}"#, "mtu"),
            (r#"{"podCIDR":"10.244.0.0/16","bridge":"a/b"}"#, "bridge"),
            (
                r#"{"podCIDR":"10.244.0.0/16","ipam":{"type":"dhcp"}}"#,
                "host-local",
            ),
        ] {
            let e = format!("{:#}", NetConf::parse(text).unwrap_err());
            assert!(e.contains(want), "{text}: {e}");
        }
    }
}
