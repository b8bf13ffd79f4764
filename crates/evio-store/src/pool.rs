//! The one claim algorithm behind both per-node claims: pod subnets and host overlay addresses (VIPs).
//!
//! A [`Pool`] is a numbered list of candidates (index 0 is the lowest) that nodes claim one each. A claim is
//! one JSON record (a [`Claim`]) stored under two keys, `<by-item prefix><item>` and `<by-node prefix><node>`,
//! written and deleted together in one transaction. [`Store::claim`] is the compare-and-swap loop that both
//! `claim_subnet` and `claim_address` use (docs/store.md).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::ops::Range;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp, TxnOpResponse};
use ipnet::Ipv4Net;
use tracing::{debug, warn};

use crate::claim::Claim;
use crate::error::StoreError;
use crate::keys;
use crate::plan::{SubnetPlan, host_range};
use crate::records::{AddressClaim, SubnetClaim};
use crate::store::{Store, check_node, parse_kv, parse_or_warn};

/// How many lost races a claim tolerates before giving up. Every lost race means another claim succeeded, so
/// this bounds nothing in practice with a few thousand nodes; it only stops a livelock.
const MAX_ATTEMPTS: u32 = 10_000;

/// The most of the lowest free candidates a claimer that lost races chooses from (a power of two).
const CONTENTION_WINDOW: usize = 64;

/// What nodes claim one each: candidates `0..len()`, lowest first, and the errors that name them.
pub(crate) trait Pool {
    type Claim: Claim;

    /// How many candidates there are.
    fn len(&self) -> u64;
    /// The candidate at `index` (below `len()`).
    fn candidate(&self, index: u64) -> Item<Self>;
    /// The index of `item` when it is one of the candidates.
    fn index_of(&self, item: Item<Self>) -> Option<u64>;
    /// The candidates that a claim stored under the by-item key segment `segment` makes unavailable (it
    /// may be a claim made under another pool, e.g. an older plan), or None when the segment is unparsable.
    fn blocked_by(&self, segment: &str) -> Option<Range<u64>>;
    /// Whether a candidate is taken exactly when its own by-item key exists (no other key blocks it), so
    /// that a claim may read windows of candidate keys instead of all by-item keys.
    fn exact_keys(&self) -> bool;
    /// For a claim the node holds that is not a candidate (the pool changed): the error that refuses it,
    /// or None to move the claim to a candidate in the same transaction.
    fn refuse_foreign(&self, held: &Self::Claim) -> Option<StoreError>;
    /// A requested item that is not a candidate (only pools whose items can be requested are asked).
    fn not_a_candidate(&self, item: Item<Self>) -> StoreError;
    /// A requested item that another node holds (likewise).
    fn conflict(&self, item: Item<Self>, holder: String) -> StoreError;
    /// No candidate is free; `held` claims exist.
    fn exhausted(&self, held: usize) -> StoreError;
}

type Item<P> = <<P as Pool>::Claim as Claim>::Item;

/// The pod subnets of a plan.
pub(crate) struct Subnets<'a>(pub &'a SubnetPlan);

impl Pool for Subnets<'_> {
    type Claim = SubnetClaim;

    fn len(&self) -> u64 {
        self.0.len()
    }

    fn candidate(&self, index: u64) -> Ipv4Net {
        self.0.subnet(index).expect("index below len").subnet
    }

    fn index_of(&self, subnet: Ipv4Net) -> Option<u64> {
        self.0.index_of(&subnet)
    }

    fn blocked_by(&self, segment: &str) -> Option<Range<u64>> {
        // By overlap, not equality: claims of an older plan may have another prefix length.
        keys::parse_subnet_segment(segment).map(|net| self.0.overlapping(&net))
    }

    fn exact_keys(&self) -> bool {
        // A claim of an older plan blocks every candidate it overlaps: only a full read sees them all.
        false
    }

    fn refuse_foreign(&self, held: &SubnetClaim) -> Option<StoreError> {
        Some(StoreError::OutsidePlan {
            node: held.node.clone(),
            held: held.subnet.to_string(),
            pool: self.0.pool(),
        })
    }

    // `claim_subnet` never requests a particular subnet; should a caller ever do, these are its errors.
    fn not_a_candidate(&self, subnet: Ipv4Net) -> StoreError {
        StoreError::Config(format!("{subnet} is not a subnet of {}", self.0.pool()))
    }

    fn conflict(&self, subnet: Ipv4Net, holder: String) -> StoreError {
        StoreError::Config(format!("subnet {subnet} is held by node {holder}"))
    }

    fn exhausted(&self, held: usize) -> StoreError {
        StoreError::Exhausted {
            pool: self.0.pool(),
            capacity: self.0.len(),
            held,
        }
    }
}

/// The usable host addresses of an overlay CIDR (all but network and broadcast, except in /31 and /32).
pub(crate) struct Addresses {
    pool: Ipv4Net,
    first: u32,
    last: u32,
}

impl Addresses {
    pub(crate) fn new(pool: &Ipv4Net) -> Addresses {
        let pool = pool.trunc();
        let (first, last) = host_range(&pool);
        Addresses { pool, first, last }
    }
}

impl Pool for Addresses {
    type Claim = AddressClaim;

    fn len(&self) -> u64 {
        u64::from(self.last - self.first) + 1
    }

    fn candidate(&self, index: u64) -> Ipv4Addr {
        Ipv4Addr::from(self.first + index as u32)
    }

    fn index_of(&self, address: Ipv4Addr) -> Option<u64> {
        let n = u32::from(address);
        (self.first..=self.last)
            .contains(&n)
            .then(|| u64::from(n - self.first))
    }

    fn blocked_by(&self, segment: &str) -> Option<Range<u64>> {
        let a: Ipv4Addr = segment.parse().ok()?;
        Some(self.index_of(a).map_or(0..0, |i| i..i + 1))
    }

    fn exact_keys(&self) -> bool {
        true
    }

    fn refuse_foreign(&self, _held: &AddressClaim) -> Option<StoreError> {
        None
    }

    fn not_a_candidate(&self, address: Ipv4Addr) -> StoreError {
        StoreError::BadAddress {
            address,
            pool: self.pool,
        }
    }

    fn conflict(&self, address: Ipv4Addr, holder: String) -> StoreError {
        StoreError::Conflict { address, holder }
    }

    fn exhausted(&self, held: usize) -> StoreError {
        StoreError::AddressesExhausted {
            pool: self.pool,
            held,
        }
    }
}

/// How many by-item keys the first read of an exact-key pool lists (keys only). With at most this many
/// claims the read is complete; with more, a claim reads windows of candidates instead of all keys.
const PROBE_KEYS: i64 = 128;

/// How many candidates one window read checks (a count-only get per candidate key, one transaction; etcd
/// allows 128 operations per transaction by default).
const WINDOW: usize = 64;

/// Window reads that found nothing free before a claim reads all by-item keys.
const EMPTY_WINDOWS: u32 = 2;

/// What a claim knows about the pool.
struct Knowledge {
    /// Candidates seen taken.
    taken: HashSet<u64>,
    /// Every candidate not in `taken` was free at the last full read (or seen free since).
    complete: bool,
    /// Where the search for free candidates starts (wrapping): 0 with complete knowledge (lowest first).
    start: u64,
    /// By-item keys at the last complete read (a full read, or a probe that saw them all).
    held: usize,
    /// Window reads without a free candidate since the last full read.
    empty_windows: u32,
}

impl Knowledge {
    fn new() -> Knowledge {
        Knowledge {
            taken: HashSet::new(),
            complete: false,
            start: 0,
            held: 0,
            empty_windows: 0,
        }
    }

    /// Up to `n` candidate indices not seen taken, from `start` upwards (wrapping).
    fn next_free<P: Pool>(&self, pool: &P, n: usize) -> Vec<u64> {
        let len = pool.len();
        (0..len)
            .map(|i| (self.start + i) % len)
            .filter(|i| !self.taken.contains(i))
            .take(n)
            .collect()
    }
}

/// A pseudo-random number from the node name, the attempt and the clock (no cryptographic need: it only
/// spreads concurrent claimers over different candidates).
fn spread(node: &str, attempt: u32) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write(node.as_bytes());
    h.write_u32(attempt);
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish() as usize
}

/// What one read (or the `else` branch of a lost compare-and-swap) asks for, besides the node's by-node key
/// and the requested item's by-item key (when an item is requested).
enum Read {
    /// Nothing more (a requested item).
    Owner,
    /// All keys under the by-item prefix (keys only).
    Full,
    /// The first [`PROBE_KEYS`] by-item keys and how many there are.
    Probe,
    /// Whether these candidates' by-item keys exist (count only).
    Window(Vec<u64>),
}

/// What a read says about the node's own claim and the requested item's holder.
struct Seen {
    own: Option<KeyValue>,
    holder: Option<KeyValue>,
    /// The candidates of a `Full`, `Probe` or `Window` read seen free, in search order.
    free: Vec<u64>,
}

impl Read {
    fn ops<P: Pool>(&self, pool: &P, by_node: &str, requested: Option<Item<P>>) -> Vec<TxnOp> {
        let mut v = vec![TxnOp::get(by_node, None)];
        if let Some(item) = requested {
            v.push(TxnOp::get(P::Claim::by_item(item), None));
        }
        let keys = GetOptions::new().with_prefix().with_keys_only();
        match self {
            Read::Owner => {}
            Read::Full => v.push(TxnOp::get(P::Claim::BY_ITEM, Some(keys))),
            Read::Probe => v.push(TxnOp::get(
                P::Claim::BY_ITEM,
                Some(keys.with_limit(PROBE_KEYS)),
            )),
            Read::Window(cands) => v.extend(cands.iter().map(|&i| {
                TxnOp::get(
                    P::Claim::by_item(pool.candidate(i)),
                    Some(GetOptions::new().with_count_only()),
                )
            })),
        }
        v
    }

    /// Folds the responses to [`Read::ops`] into `k`.
    fn apply<P: Pool>(
        &self,
        pool: &P,
        requested: bool,
        k: &mut Knowledge,
        rs: &[TxnOpResponse],
    ) -> Seen {
        let get = |i: usize| match rs.get(i) {
            Some(TxnOpResponse::Get(g)) => Some(g),
            _ => None,
        };
        let kvs = |i: usize| get(i).map_or(&[][..], |g| g.kvs());
        let rest = if requested { 2 } else { 1 };
        let mut seen = Seen {
            own: kvs(0).first().cloned(),
            holder: if requested {
                kvs(1).first().cloned()
            } else {
                None
            },
            free: Vec::new(),
        };
        let mark = |k: &mut Knowledge, items: &[KeyValue]| {
            for kv in items {
                let key = kv.key_str().unwrap_or_default();
                match pool.blocked_by(key.strip_prefix(P::Claim::BY_ITEM).unwrap_or_default()) {
                    Some(r) => k.taken.extend(r),
                    None => warn!(key, "ignoring an unparsable claim key"),
                }
            }
        };
        match self {
            Read::Owner => {}
            Read::Full => {
                let items = kvs(rest);
                k.taken.clear();
                mark(k, items);
                *k = Knowledge {
                    taken: std::mem::take(&mut k.taken),
                    complete: true,
                    start: 0,
                    held: items.len(),
                    empty_windows: 0,
                };
                seen.free = k.next_free(pool, WINDOW);
            }
            Read::Probe => {
                let g = get(rest);
                mark(k, g.map_or(&[][..], |g| g.kvs()));
                let count = g.map_or(0, |g| g.count()).max(0) as u64;
                if g.is_some_and(|g| !g.more()) {
                    // Every claim fit: as good as a full read.
                    k.complete = true;
                    k.start = 0;
                    k.held = count as usize;
                    seen.free = k.next_free(pool, WINDOW);
                } else {
                    // Many claims: start looking where a pool filled from the bottom has its free
                    // candidates (at the bottom when there are more claims than candidates: they are
                    // not all in this pool); nothing is known free yet (a window read follows).
                    k.complete = false;
                    k.start = if count < pool.len() { count } else { 0 };
                }
            }
            Read::Window(cands) => {
                for (j, &i) in cands.iter().enumerate() {
                    if get(rest + j).is_some_and(|g| g.count() > 0) {
                        k.taken.insert(i);
                    } else if !k.taken.contains(&i) {
                        seen.free.push(i);
                    }
                }
            }
        }
        seen
    }
}

impl Store {
    // ---------------------------------------------------------------- pod subnets

    /// Claims a pod subnet for `node`: its existing claim if it has one, else the lowest free subnet of
    /// `plan`, with one compare-and-swap transaction that creates both index keys or nothing. A claim the
    /// node holds outside `plan` (the pool or nodeBits changed) is [`StoreError::OutsidePlan`].
    pub async fn claim_subnet(
        &self,
        plan: &SubnetPlan,
        node: &str,
    ) -> Result<SubnetClaim, StoreError> {
        self.claim(&Subnets(plan), node, None).await
    }

    /// The node's subnet claim, if any.
    pub async fn subnet_of(&self, node: &str) -> Result<Option<SubnetClaim>, StoreError> {
        self.claim_of(node).await
    }

    /// All subnet claims, lowest subnet first.
    pub async fn subnet_claims(&self) -> Result<Vec<SubnetClaim>, StoreError> {
        self.claims().await
    }

    /// Frees the node's subnet claim (both keys in one transaction). Returns the claim that was freed.
    pub async fn release_subnet(&self, node: &str) -> Result<Option<SubnetClaim>, StoreError> {
        self.release(node).await
    }

    // ---------------------------------------------------------------- host overlay addresses

    /// Claims a host overlay address (VIP) in `pool` for `node`. Stable: a node that holds one gets it back.
    /// With `requested`, the node gets exactly that address (moving its claim if it held another), or
    /// [`StoreError::Conflict`] when another node holds it. Network and broadcast addresses are never handed
    /// out. A claim the node holds outside `pool` (the overlay CIDR changed) is moved into it.
    pub async fn claim_address(
        &self,
        pool: &Ipv4Net,
        node: &str,
        requested: Option<Ipv4Addr>,
    ) -> Result<AddressClaim, StoreError> {
        self.claim(&Addresses::new(pool), node, requested).await
    }

    /// The node's address claim, if any.
    pub async fn address_of(&self, node: &str) -> Result<Option<AddressClaim>, StoreError> {
        self.claim_of(node).await
    }

    /// All address claims, lowest address first.
    pub async fn address_claims(&self) -> Result<Vec<AddressClaim>, StoreError> {
        self.claims().await
    }

    /// Frees the node's address claim (both keys in one transaction). Returns the claim that was freed.
    pub async fn release_address(&self, node: &str) -> Result<Option<AddressClaim>, StoreError> {
        self.release(node).await
    }

    // ---------------------------------------------------------------- the algorithm

    /// Claims a candidate of `pool` for `node`: its existing claim if it has one, `requested` if given, else
    /// the lowest free candidate, with one compare-and-swap transaction that writes both index keys or nothing.
    pub(crate) async fn claim<P: Pool>(
        &self,
        pool: &P,
        node: &str,
        requested: Option<Item<P>>,
    ) -> Result<P::Claim, StoreError> {
        let ops = &P::Claim::OPS;
        check_node(node)?;
        if let Some(item) = requested
            && pool.index_of(item).is_none()
        {
            return Err(pool.not_a_candidate(item));
        }
        let by_node = P::Claim::by_node(node);
        let mut c = self.client.clone();
        let mut k = Knowledge::new();
        // The node's own claim and (the requested item's holder, or what is free) in one consistent read.
        let mut read = Some(match requested {
            Some(_) => Read::Owner,
            None if pool.exact_keys() => Read::Probe,
            None => Read::Full,
        });
        let mut seen = Seen {
            own: None,
            holder: None,
            free: Vec::new(),
        };
        // A full read found no free candidate: the pool is exhausted (unless the node holds one).
        let mut full_empty = false;
        // Every round trip counts: reads and compare-and-swap attempts.
        let mut attempt = 0u32;
        for _ in 0..MAX_ATTEMPTS {
            if let Some(r) = read.take() {
                let txn = Txn::new().and_then(r.ops(pool, &by_node, requested));
                let resp = self.op(ops.claim_read, c.txn(txn)).await?;
                seen = r.apply(
                    pool,
                    requested.is_some(),
                    &mut k,
                    resp.op_responses().as_slice(),
                );
                full_empty = matches!(r, Read::Full) && seen.free.is_empty();
                if matches!(r, Read::Window(_)) && seen.free.is_empty() && !k.complete {
                    k.empty_windows += 1;
                }
            }
            let own: Option<(KeyValue, P::Claim)> = match seen.own.take() {
                Some(kv) => {
                    let claim = parse_kv(&kv)?;
                    Some((kv, claim))
                }
                None => None,
            };
            if let Some((_, o)) = &own {
                let item = o.item();
                if pool.index_of(item).is_none() {
                    if let Some(e) = pool.refuse_foreign(o) {
                        return Err(e);
                    }
                } else if requested.is_none_or(|r| r == item) {
                    return Ok(o.clone());
                }
                // Otherwise move the claim (to the requested item, or into the pool) in one transaction.
            }
            let (target, fresh) = match requested {
                Some(item) => {
                    if let Some(kv) = &seen.holder {
                        let h: P::Claim = parse_kv(kv)?;
                        if h.node() != node {
                            return Err(pool.conflict(item, h.node().to_string()));
                        }
                    }
                    (item, Read::Owner)
                }
                None => {
                    seen.free.retain(|i| !k.taken.contains(i));
                    if seen.free.is_empty() {
                        if full_empty {
                            return Err(pool.exhausted(k.held));
                        }
                        // Nothing known free: read the next window of candidates not seen taken, or all
                        // keys when windows keep finding nothing (or none is left to look at).
                        let next = k.next_free(pool, WINDOW);
                        read = Some(if next.is_empty() || k.empty_windows >= EMPTY_WINDOWS {
                            Read::Full
                        } else {
                            Read::Window(next)
                        });
                        seen.own = own.map(|(kv, _)| kv);
                        continue;
                    }
                    // The first free one in search order (the lowest, with complete knowledge). A
                    // claimer that lost races picks at random among the first free candidates instead, in
                    // a window that doubles with every lost race (2, 4, ... up to CONTENTION_WINDOW): a few
                    // simultaneous claimers still get the lowest ones, while hundreds do not all retry on
                    // the same one (each round costs an etcd commit). The pool fills from the bottom.
                    let window = 1usize << attempt.min(CONTENTION_WINDOW.trailing_zeros());
                    let choices = &seen.free[..window.min(seen.free.len())];
                    let target = choices[spread(node, attempt) % choices.len()];
                    // What a lost race reads back: while few claims are held (the last read saw them
                    // all), all of them again in one small range, which also shows what others took
                    // elsewhere; with many held, only whether the candidates chosen from are still free.
                    let fresh = if k.complete && k.held < PROBE_KEYS as usize {
                        Read::Probe
                    } else {
                        Read::Window(seen.free.clone())
                    };
                    (pool.candidate(target), fresh)
                }
            };
            let claim = P::Claim::new(node, target);
            let value = serde_json::to_string(&claim).expect("claim serializes");
            let by_item = P::Claim::by_item(target);
            let mut when = vec![Compare::create_revision(
                by_item.clone(),
                CompareOp::Equal,
                0,
            )];
            let mut then = vec![
                TxnOp::put(by_item, value.clone(), None),
                TxnOp::put(by_node.clone(), value, None),
            ];
            match &own {
                Some((kv, o)) => {
                    // Moving: the node's claim must be the one read, and its old item is freed with it.
                    when.push(Compare::mod_revision(
                        by_node.clone(),
                        CompareOp::Equal,
                        kv.mod_revision(),
                    ));
                    then.push(TxnOp::delete(P::Claim::by_item(o.item()), None));
                }
                None => when.push(Compare::create_revision(
                    by_node.clone(),
                    CompareOp::Equal,
                    0,
                )),
            }
            // A lost race returns fresh state in the same round trip: the node's claim, and whether the
            // candidates this claimer chose from are still free (not all by-item keys: that read grew with
            // every claim held).
            let txn = Txn::new()
                .when(when)
                .and_then(then)
                .or_else(fresh.ops(pool, &by_node, requested));
            let r = self.op(ops.claim, c.txn(txn)).await?;
            if r.succeeded() {
                debug!(node, item = %target, attempt, "{}", ops.claim);
                return Ok(claim);
            }
            seen = fresh.apply(
                pool,
                requested.is_some(),
                &mut k,
                r.op_responses().as_slice(),
            );
            full_empty = false;
            attempt += 1;
        }
        Err(StoreError::Contention {
            what: ops.claim,
            attempts: MAX_ATTEMPTS,
        })
    }

    /// The node's claim of kind `C`, if any.
    pub(crate) async fn claim_of<C: Claim>(&self, node: &str) -> Result<Option<C>, StoreError> {
        check_node(node)?;
        self.get_one(C::OPS.read, &C::by_node(node))
            .await?
            .map(|kv| parse_kv(&kv))
            .transpose()
    }

    /// All claims of kind `C`, lowest item first.
    pub(crate) async fn claims<C: Claim>(&self) -> Result<Vec<C>, StoreError> {
        let (_, kvs) = self.list(C::OPS.list, C::BY_NODE).await?;
        let mut v: Vec<C> = kvs.iter().filter_map(parse_or_warn).collect();
        v.sort_by_key(C::order);
        Ok(v)
    }

    /// Frees the node's claim of kind `C` (both keys in one transaction). Returns the claim that was freed.
    pub(crate) async fn release<C: Claim>(&self, node: &str) -> Result<Option<C>, StoreError> {
        check_node(node)?;
        let by_node = C::by_node(node);
        for _ in 0..100 {
            let Some(kv) = self.get_one(C::OPS.release_read, &by_node).await? else {
                return Ok(None);
            };
            let claim: C = parse_kv(&kv)?;
            let by_item = C::by_item(claim.item());
            // Delete the by-item key only if it still holds this very claim (it always should).
            let owner_is_us = Txn::new()
                .when([Compare::value(
                    by_item.clone(),
                    CompareOp::Equal,
                    kv.value().to_vec(),
                )])
                .and_then([TxnOp::delete(by_item, None)]);
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    by_node.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([
                    TxnOp::delete(by_node.clone(), None),
                    TxnOp::txn(owner_is_us),
                ]);
            let mut c = self.client.clone();
            if self.op(C::OPS.release, c.txn(txn)).await?.succeeded() {
                return Ok(Some(claim));
            }
        }
        Err(StoreError::Contention {
            what: C::OPS.release,
            attempts: 100,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_candidates_skip_network_and_broadcast() {
        let p = Addresses::new(&"10.10.0.0/29".parse().unwrap());
        assert_eq!(p.len(), 6);
        assert_eq!(p.candidate(0).to_string(), "10.10.0.1");
        assert_eq!(p.candidate(5).to_string(), "10.10.0.6");
        assert_eq!(p.index_of("10.10.0.6".parse().unwrap()), Some(5));
        for outside in ["10.10.0.0", "10.10.0.7", "10.10.1.1"] {
            assert_eq!(p.index_of(outside.parse().unwrap()), None, "{outside}");
        }
        assert_eq!(p.blocked_by("10.10.0.3"), Some(2..3));
        assert_eq!(p.blocked_by("10.99.0.3"), Some(0..0));
        assert_eq!(p.blocked_by("10.10.0.3-32"), None);
        // /31 and /32: every address is usable.
        assert_eq!(Addresses::new(&"10.10.0.0/31".parse().unwrap()).len(), 2);
        let one = Addresses::new(&"10.10.0.9/32".parse().unwrap());
        assert_eq!(
            (one.len(), one.candidate(0).to_string()),
            (1, "10.10.0.9".into())
        );
    }

    #[test]
    fn subnet_candidates_are_blocked_by_overlap() {
        let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        let p = Subnets(&plan);
        assert_eq!(p.candidate(3).to_string(), "10.244.3.0/24");
        assert_eq!(p.blocked_by("10.244.2.0-23"), Some(2..4));
        assert_eq!(p.blocked_by("10.244.2.0"), None);
        assert_eq!(
            SubnetClaim::by_item("10.244.3.0/24".parse().unwrap()),
            "/evio/v1/subnets/by-subnet/10.244.3.0-24"
        );
        assert_eq!(
            AddressClaim::by_item("10.10.0.3".parse().unwrap()),
            "/evio/v1/addresses/by-address/10.10.0.3"
        );
        assert_eq!(AddressClaim::by_node("n1"), "/evio/v1/addresses/by-node/n1");
    }

    #[test]
    fn next_free_from_the_start_wrapping() {
        let p = Addresses::new(&"10.10.0.0/28".parse().unwrap());
        let mut k = Knowledge::new();
        k.taken = [0, 2, 3].into();
        assert_eq!(k.next_free(&p, 1), [1]);
        assert_eq!(k.next_free(&p, 4), [1, 4, 5, 6]);
        k.start = 12;
        assert_eq!(k.next_free(&p, 4), [12, 13, 1, 4]);
        k.taken = (0..p.len()).collect();
        assert!(k.next_free(&p, 64).is_empty());
    }
}
