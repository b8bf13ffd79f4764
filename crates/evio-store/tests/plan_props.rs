//! Property tests of the subnet arithmetic.

use std::net::Ipv4Addr;

use evio_store::SubnetPlan;
use ipnet::Ipv4Net;
use proptest::prelude::*;

fn plans() -> impl Strategy<Value = (u32, u8, u8)> {
    (any::<u32>(), 8u8..=30)
        .prop_flat_map(|(addr, len)| (Just(addr), Just(len), 0u8..=(30 - len).min(12)))
}

proptest! {
    #[test]
    fn subnets_tile_the_pool((addr, len, bits) in plans()) {
        let pool = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap().trunc();
        let plan = SubnetPlan::new(pool, bits).unwrap();
        prop_assert_eq!(plan.len(), 1u64 << bits);
        let size = 1u64 << (32 - u32::from(len) - u32::from(bits));
        let mut expect = u64::from(u32::from(pool.network()));
        for (i, s) in plan.iter().enumerate() {
            // Contiguous, in order, inside the pool, of the right size.
            prop_assert_eq!(u64::from(u32::from(s.subnet.network())), expect);
            prop_assert_eq!(s.subnet.prefix_len(), len + bits);
            prop_assert!(pool.contains(&s.subnet));
            prop_assert_eq!(plan.index_of(&s.subnet), Some(i as u64));
            // Gateway .1, range .2 .. broadcast-1, never the network or broadcast address.
            let net = u32::from(s.subnet.network());
            let bc = u32::from(s.subnet.broadcast());
            prop_assert_eq!(u32::from(s.gateway), net + 1);
            prop_assert_eq!(u32::from(s.range_start), net + 2);
            prop_assert_eq!(u32::from(s.range_end), bc - 1);
            prop_assert!(s.range_start <= s.range_end);
            prop_assert_eq!(u64::from(s.pod_addresses()), size - 3);
            prop_assert_eq!(plan.overlapping(&s.subnet), i as u64..i as u64 + 1);
            expect += size;
            if i > 64 { break; }
        }
        prop_assert!(plan.subnet(plan.len()).is_none());
        let last = plan.subnet(plan.len() - 1).unwrap();
        prop_assert_eq!(last.subnet.broadcast(), pool.broadcast());
    }

    #[test]
    fn too_small_or_not_a_network_is_refused(addr in any::<u32>(), len in 0u8..=32, bits in 0u8..=30) {
        let net = Ipv4Net::new(Ipv4Addr::from(addr), len).unwrap();
        let r = SubnetPlan::new(net, bits);
        let ok = net.trunc() == net && u32::from(len) + u32::from(bits) <= 30;
        prop_assert_eq!(r.is_ok(), ok);
        let text = SubnetPlan::parse(&net.to_string(), bits);
        prop_assert_eq!(text.is_ok(), ok);
    }
}
