//! Integration tests against a real etcd (started per test by evio_testbed::Etcd, removed on drop).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use evio_store::{EtcdOptions, NodeRecord, Store, StoreError, StoreEvent, SubnetPlan};
use evio_testbed::Etcd;

fn opts(etcd: &Etcd) -> EtcdOptions {
    EtcdOptions::new([etcd.endpoint()])
}

async fn connect(etcd: &Etcd) -> Store {
    Store::connect(&opts(etcd)).await.expect("connect")
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn claims_are_unique_stable_and_exhaust_cleanly() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        let mut tasks = Vec::new();
        for i in 0..256 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.claim_subnet(&plan, &format!("node-{i}")).await
            }));
        }
        let mut subnets = HashSet::new();
        for t in tasks {
            let c = t.await.unwrap().expect("claim");
            assert!(plan.index_of(&c.subnet).is_some());
            assert!(subnets.insert(c.subnet), "{} handed out twice", c.subnet);
        }
        assert_eq!(subnets.len(), 256);

        // The 257th node is refused with a message that says why.
        let e = store.claim_subnet(&plan, "node-256").await.unwrap_err();
        assert!(matches!(e, StoreError::Exhausted { held: 256, .. }), "{e}");
        let msg = e.to_string();
        assert!(msg.contains("exhausted") && msg.contains("256"), "{msg}");

        // Re-running a node returns its own subnet.
        let before = store.subnet_of("node-17").await.unwrap().unwrap();
        let again = store.claim_subnet(&plan, "node-17").await.unwrap();
        assert_eq!(before, again);

        // Release, then a new node gets the freed subnet.
        let freed = store.release_subnet("node-17").await.unwrap().unwrap();
        assert_eq!(freed.subnet, before.subnet);
        assert_eq!(store.subnet_of("node-17").await.unwrap(), None);
        let newer = store.claim_subnet(&plan, "node-new").await.unwrap();
        assert_eq!(newer.subnet, freed.subnet);
        assert_eq!(store.release_subnet("node-17").await.unwrap(), None);

        let claims = store.subnet_claims().await.unwrap();
        assert_eq!(claims.len(), 256);
        assert!(claims.iter().any(|c| c.node == "node-new"));
    });
}

#[test]
fn lowest_free_first_and_claims_survive_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let r = rt();
    let plan = SubnetPlan::parse("10.96.0.0/22", 2).unwrap();
    let (a, b) = r.block_on(async {
        let store = connect(&etcd).await;
        let a = store.claim_subnet(&plan, "a").await.unwrap();
        let b = store.claim_subnet(&plan, "b").await.unwrap();
        assert_eq!(a.subnet.to_string(), "10.96.0.0/24");
        assert_eq!(b.subnet.to_string(), "10.96.1.0/24");
        (a, b)
    });
    etcd.restart();
    r.block_on(async {
        let store = connect(&etcd).await;
        assert_eq!(store.claim_subnet(&plan, "a").await.unwrap(), a);
        assert_eq!(store.subnet_of("b").await.unwrap(), Some(b));
        assert_eq!(
            store
                .claim_subnet(&plan, "c")
                .await
                .unwrap()
                .subnet
                .to_string(),
            "10.96.2.0/24"
        );
    });
}

#[test]
fn unreachable_etcd_fails_within_the_bound() {
    let port = evio_testbed::free_port();
    rt().block_on(async {
        let mut o = EtcdOptions::new([format!("http://127.0.0.1:{port}")]);
        o.timeout = Duration::from_secs(2);
        let t = Instant::now();
        let e = Store::connect(&o).await.err().expect("must fail");
        assert!(
            t.elapsed() < Duration::from_secs(4),
            "took {:?}",
            t.elapsed()
        );
        assert!(e.is_unreachable(), "{e}");
        assert!(e.to_string().contains("unreachable"), "{e}");
    });
    // A frozen (partitioned) etcd: requests hang, the bound still holds.
    let etcd = Etcd::start();
    rt().block_on(async {
        let mut o = opts(&etcd);
        o.timeout = Duration::from_secs(1);
        let store = Store::connect(&o).await.unwrap();
        etcd.freeze();
        let t = Instant::now();
        let e = store
            .claim_subnet(&SubnetPlan::parse("10.1.0.0/16", 8).unwrap(), "x")
            .await
            .unwrap_err();
        etcd.thaw();
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "took {:?}",
            t.elapsed()
        );
        assert!(e.is_unreachable(), "{e}");
    });
}

#[test]
fn registration_lives_with_its_lease() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let mut rec = NodeRecord::new("n1");
        rec.address = "10.10.0.1".parse().unwrap();
        let reg = store
            .register(rec.clone(), Duration::from_secs(2))
            .await
            .unwrap();
        assert!(store.is_alive("n1").await.unwrap());
        // Kept alive past several TTLs.
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(store.is_alive("n1").await.unwrap());
        rec.listen_port = 51820;
        reg.update(rec.clone()).await.unwrap();
        assert_eq!(store.node("n1").await.unwrap().unwrap().listen_port, 51820);
        // The holder stops renewing (as if it crashed): gone after the TTL.
        reg.abandon();
        assert!(store.is_alive("n1").await.unwrap());
        let t = Instant::now();
        while store.is_alive("n1").await.unwrap() {
            assert!(
                t.elapsed() < Duration::from_secs(6),
                "registration outlived its TTL"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Revoke removes it at once.
        let reg = store
            .register(NodeRecord::new("n2"), Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(store.nodes().await.unwrap().len(), 1);
        reg.revoke().await.unwrap();
        assert!(!store.is_alive("n2").await.unwrap());
    });
}

#[test]
fn watch_sees_changes_after_its_snapshot() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
        store.claim_subnet(&plan, "before").await.unwrap();
        let (snap, mut w) = store.watch().await.unwrap();
        assert_eq!(snap.subnets.len(), 1);
        assert_eq!(snap.subnets[0].node, "before");
        let c = store.claim_subnet(&plan, "after").await.unwrap();
        let reg = store
            .register(NodeRecord::new("after"), Duration::from_secs(10))
            .await
            .unwrap();
        let mut rec = reg.record();
        rec.listen_port = 7;
        reg.update(rec).await.unwrap();
        reg.revoke().await.unwrap();
        store.release_subnet("after").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 5 {
            let e = tokio::time::timeout(Duration::from_secs(5), w.next())
                .await
                .expect("event in time")
                .unwrap();
            got.push(e);
        }
        assert_eq!(got[0], StoreEvent::SubnetClaimed(c.clone()));
        assert!(
            matches!(&got[1], StoreEvent::NodeUp(r) if r.node == "after"),
            "{:?}",
            got[1]
        );
        assert!(
            matches!(&got[2], StoreEvent::NodeUpdated(r) if r.listen_port == 7),
            "{:?}",
            got[2]
        );
        assert_eq!(
            got[3],
            StoreEvent::NodeDown {
                node: "after".into()
            }
        );
        assert_eq!(
            got[4],
            StoreEvent::SubnetReleased {
                node: "after".into(),
                subnet: Some(c.subnet)
            }
        );
        let pool = "10.10.0.0/16".parse().unwrap();
        let a = store.claim_address(&pool, "after", None).await.unwrap();
        store.release_address("after").await.unwrap();
        let e = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(e, StoreEvent::AddressClaimed(a.clone()));
        let e = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            e,
            StoreEvent::AddressReleased {
                node: "after".into(),
                address: Some(a.address)
            }
        );
        // Nothing else: the by-subnet/by-address index keys produce no events of their own.
        assert!(w.try_next().is_none());
    });
}

#[test]
fn watch_and_registration_survive_an_etcd_restart() {
    let mut etcd = Etcd::start();
    let r = rt();
    let plan = SubnetPlan::parse("10.244.0.0/16", 8).unwrap();
    let (store, mut w, reg) = r.block_on(async {
        let store = connect(&etcd).await;
        let (_, w) = store.watch().await.unwrap();
        let reg = store
            .register(NodeRecord::new("keeper"), Duration::from_secs(3))
            .await
            .unwrap();
        (store, w, reg)
    });
    etcd.restart();
    r.block_on(async {
        // A claim made after the restart reaches the old watch.
        let mut claimed = None;
        let t = Instant::now();
        while claimed.is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "store unusable after restart"
            );
            match store.claim_subnet(&plan, "late").await {
                Ok(c) => claimed = Some(c),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        let c = claimed.unwrap();
        loop {
            let e = tokio::time::timeout(Duration::from_secs(10), w.next())
                .await
                .expect("event in time")
                .unwrap();
            if e == StoreEvent::SubnetClaimed(c.clone()) {
                break;
            }
        }
        // The registration is still alive past its TTL after the restart.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(store.is_alive("keeper").await.unwrap());

        // The lease is lost (revoked behind the holder's back): the keeper registers again.
        let old = reg.lease_id();
        store.client().lease_revoke(old).await.unwrap();
        let t = Instant::now();
        while !(reg.reregistered() && store.is_alive("keeper").await.unwrap()) {
            assert!(
                t.elapsed() < Duration::from_secs(5),
                "did not register again"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(reg.lease_id(), old);
        drop(reg);
        let t = Instant::now();
        while store.is_alive("keeper").await.unwrap() {
            assert!(t.elapsed() < Duration::from_secs(2), "drop did not revoke");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
}

#[test]
fn address_claims() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let pool = "10.10.0.0/29".parse().unwrap();
        let a = store.claim_address(&pool, "a", None).await.unwrap();
        assert_eq!(a.address.to_string(), "10.10.0.1");
        assert_eq!(store.claim_address(&pool, "a", None).await.unwrap(), a);
        let b = store
            .claim_address(&pool, "b", Some("10.10.0.5".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(b.address.to_string(), "10.10.0.5");
        let e = store
            .claim_address(&pool, "c", Some("10.10.0.5".parse().unwrap()))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Conflict { holder, .. } if holder == "b"),
            "{e}"
        );
        for bad in ["10.10.0.0", "10.10.0.7", "10.10.1.1"] {
            let e = store
                .claim_address(&pool, "c", Some(bad.parse().unwrap()))
                .await
                .unwrap_err();
            assert!(matches!(e, StoreError::BadAddress { .. }), "{bad}: {e}");
        }
        // Moving a's claim to a requested address frees the old one in the same transaction.
        let moved = store
            .claim_address(&pool, "a", Some("10.10.0.6".parse().unwrap()))
            .await
            .unwrap();
        assert_eq!(moved.address.to_string(), "10.10.0.6");
        let c = store.claim_address(&pool, "c", None).await.unwrap();
        assert_eq!(c.address.to_string(), "10.10.0.1");
        // Fill the rest: .2 .3 .4, then exhausted (network .0 and broadcast .7 never handed out).
        for n in ["d", "e", "f"] {
            store.claim_address(&pool, n, None).await.unwrap();
        }
        let e = store.claim_address(&pool, "g", None).await.unwrap_err();
        assert!(
            matches!(e, StoreError::AddressesExhausted { held: 6, .. }),
            "{e}"
        );
        assert_eq!(
            store
                .release_address("c")
                .await
                .unwrap()
                .unwrap()
                .address
                .to_string(),
            "10.10.0.1"
        );
        assert_eq!(
            store
                .claim_address(&pool, "g", None)
                .await
                .unwrap()
                .address
                .to_string(),
            "10.10.0.1"
        );
        let all = store.address_claims().await.unwrap();
        assert_eq!(all.len(), 6);
        let set: HashSet<_> = all.iter().map(|c| c.address).collect();
        assert_eq!(set.len(), 6);
    });
}

#[test]
fn a_changed_plan_is_detected_and_old_claims_stay_taken() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        let old = SubnetPlan::parse("10.80.0.0/16", 7).unwrap(); // /23 subnets
        let a = store.claim_subnet(&old, "old-a").await.unwrap();
        assert_eq!(a.subnet.to_string(), "10.80.0.0/23");
        let new = SubnetPlan::parse("10.80.0.0/16", 8).unwrap(); // /24 subnets
        // old-a's /23 is not a subnet of the new plan: refused with advice, not silently replaced.
        let e = store.claim_subnet(&new, "old-a").await.unwrap_err();
        assert!(matches!(e, StoreError::OutsidePlan { .. }), "{e}");
        assert!(e.to_string().contains("evioctl release old-a"), "{e}");
        // A new node does not get a /24 inside old-a's /23.
        let b = store.claim_subnet(&new, "new-b").await.unwrap();
        assert_eq!(b.subnet.to_string(), "10.80.2.0/24");
        // Bad node names never become keys.
        let e = store.claim_subnet(&new, "../evil").await.unwrap_err();
        assert!(matches!(e, StoreError::InvalidNodeName(_)), "{e}");
    });
}

/// 256 agents claim a VIP at once in an overlay CIDR that they fill exactly: 256 distinct addresses, within
/// a few seconds (a strict "lowest free address" retry took 13 s in release, docs/bench/store.md), the next
/// claim refused, explicit and moved claims consistent with the index.
#[test]
fn concurrent_address_claims_fill_the_pool() {
    let etcd = Etcd::start();
    rt().block_on(async {
        let store = connect(&etcd).await;
        // A /23 has 510 host addresses: every other one of the lowest 508 is claimed explicitly first
        // (--address), so that exactly 256 are free and scattered among held ones.
        let pool: ipnet::Ipv4Net = "10.78.0.0/23".parse().unwrap();
        let (first, last) = evio_store::host_range(&pool);
        assert_eq!(last - first + 1, 510);
        let explicit: Vec<Ipv4Addr> = (0..254).map(|i| Ipv4Addr::from(first + 2 * i + 1)).collect();
        let mut tasks = Vec::new();
        for (i, a) in explicit.iter().enumerate() {
            let (s, a) = (store.clone(), *a);
            tasks.push(tokio::spawn(async move {
                s.claim_address(&pool, &format!("fixed-{i}"), Some(a)).await
            }));
        }
        let mut held = HashSet::new();
        for (t, a) in tasks.into_iter().zip(&explicit) {
            assert_eq!(t.await.unwrap().expect("explicit claim").address, *a);
            held.insert(*a);
        }

        let start = Instant::now();
        let mut tasks = Vec::new();
        for i in 0..256 {
            let s = store.clone();
            tasks.push(tokio::spawn(async move {
                s.claim_address(&pool, &format!("vip-{i}"), None).await
            }));
        }
        let mut got = Vec::new();
        for t in tasks {
            got.push(t.await.unwrap().expect("claim"));
        }
        let took = start.elapsed();
        eprintln!("256 concurrent VIP claims in {pool}: {took:?}");
        for c in &got {
            assert!(pool.contains(&c.address), "{} outside {pool}", c.address);
            assert!(held.insert(c.address), "{} handed out twice", c.address);
        }
        assert_eq!(held.len(), 510, "the pool is full");
        assert!(
            took < Duration::from_secs(10),
            "256 concurrent claims took {took:?}: do the claimers still all retry on the lowest address?"
        );

        // Both indexes agree: one by-address key per claim, holding the same record as by-node.
        let mut c = store.client();
        let by_addr = c
            .get(
                evio_store::keys::ADDRESSES_BY_ADDRESS,
                Some(evio_store::etcd_client::GetOptions::new().with_prefix()),
            )
            .await
            .unwrap();
        assert_eq!(by_addr.kvs().len(), 510);
        let claims = store.address_claims().await.unwrap();
        assert_eq!(claims.len(), 510);
        for kv in by_addr.kvs() {
            let claim: evio_store::AddressClaim = serde_json::from_slice(kv.value()).unwrap();
            assert_eq!(
                kv.key_str().unwrap(),
                evio_store::keys::address_by_address(claim.address)
            );
            assert!(claims.contains(&claim), "{claim:?} has no by-node twin");
        }

        // The next node is refused, saying how many hold addresses; a held address cannot be requested.
        let e = store.claim_address(&pool, "one-more", None).await.unwrap_err();
        assert!(matches!(e, StoreError::AddressesExhausted { held: 510, .. }), "{e}");
        assert!(e.to_string().contains("exhausted") && e.to_string().contains("510"), "{e}");
        let e = store
            .claim_address(&pool, "one-more", Some(got[7].address))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, StoreError::Conflict { holder, .. } if *holder == got[7].node),
            "{e}"
        );
        // Stable: every node gets its own address back, also in a full pool.
        assert_eq!(store.claim_address(&pool, &got[7].node, None).await.unwrap(), got[7]);

        // The overlay CIDR changed for one node: its claim moves into the new pool in one transaction and
        // frees its old address, which the next claimer of the full pool gets.
        let other = "10.79.0.0/24".parse().unwrap();
        let moved = store.claim_address(&other, &got[3].node, None).await.unwrap();
        assert_eq!(moved.address.to_string(), "10.79.0.1");
        let next = store.claim_address(&pool, "one-more", None).await.unwrap();
        assert_eq!(next.address, got[3].address);
    });
}
