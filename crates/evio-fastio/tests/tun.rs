//! TUN device creation in a throw-away namespace: offload negotiation, multiqueue, cloned
//! handles, name checks. Needs root.

mod common;

use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::enter_netns;
use evio_fastio::{PacketBatch, Tun, TunOptions, wait_readable};
use evio_testbed::{Netns, run};

/// Runs `f` on a thread inside `ns` (TUNs and sockets made there belong to that namespace).
fn in_ns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let name = ns.name().to_string();
    std::thread::spawn(move || {
        enter_netns(&name);
        f()
    })
    .join()
    .expect("thread in namespace panicked")
}

#[test]
fn offload_negotiated_in_namespace_only() {
    let ns = Netns::new("ft");
    let name = format!("t{}", &ns.name()[2..]);
    let n2 = name.clone();
    let (flags, vnet, tun) = in_ns(&ns, move || {
        let t = Tun::create(&n2, 1420, true).expect("create");
        (t.offload_flags(), t.has_vnet_hdr(), t)
    });
    assert!(vnet);
    let tso = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
    assert_eq!(flags & tso, tso, "kernel refused TSO offloads: {flags:#x}");
    assert!(ns.links().contains(&name), "tun not in the namespace");
    assert!(
        !run(&["ip", "link", "show", &name]).status.success(),
        "tun leaked into the root namespace"
    );
    let k = ns.exec_ok(&["ethtool", "-k", &name]);
    assert!(k.contains("tcp-segmentation-offload: on"), "{k}");
    let mtu = ns.exec_ok(&["ip", "-o", "link", "show", &name]);
    assert!(mtu.contains("mtu 1420") && mtu.contains(",UP"), "{mtu}");
    drop(tun);
    // The device goes with its last descriptor.
    let start = Instant::now();
    while ns.links().contains(&name) && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!ns.links().contains(&name));

    let plain = in_ns(&ns, || Tun::create("tplain0", 1500, false).expect("plain"));
    assert_eq!(plain.offload_flags(), 0);
    assert!(!plain.has_vnet_hdr());
}

#[test]
fn bad_names_are_refused() {
    for bad in ["", "a/b", "0123456789abcdef", "x\0y"] {
        let e = Tun::create(bad, 1400, true).expect_err(bad);
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
    }
}

/// Packets routed into a multiqueue TUN show up on its queues; each queue reads on its own.
#[test]
fn multiqueue_queues_all_receive() {
    let ns = Netns::new("fm");
    let name = format!("t{}", &ns.name()[2..]);
    let n2 = name.clone();
    let mut queues = in_ns(&ns, move || {
        let mut o = TunOptions::new(&n2, 1420);
        o.multi_queue = true;
        let first = Tun::with_options(o).expect("multiqueue tun");
        let second = first.clone_queue().expect("second queue");
        vec![first, second]
    });
    assert!(in_ns(&ns, || Tun::create("tsingle0", 1420, true)
        .unwrap()
        .clone_queue()
        .is_err()));
    for q in &mut queues {
        q.set_nonblocking(true).unwrap();
    }
    ns.exec_ok(&["ip", "addr", "add", "10.203.0.1/24", "dev", &name]);
    // UDP to many ports: the kernel spreads flows over the queues by hash.
    let mut cmd = String::new();
    for port in 1000..1064 {
        cmd.push_str(&format!("echo x > /dev/udp/10.203.0.9/{port}; "));
    }
    ns.exec_ok(&["bash", "-c", &cmd]);
    let mut per_queue = [0usize; 2];
    let mut batch = PacketBatch::new(64, 2048);
    let deadline = Instant::now() + Duration::from_secs(5);
    while per_queue.iter().sum::<usize>() < 64 && Instant::now() < deadline {
        let fds = [queues[0].as_raw_fd(), queues[1].as_raw_fd()];
        let ready = wait_readable(&fds, 100).unwrap();
        for (i, q) in queues.iter_mut().enumerate() {
            if ready & (1 << i) == 0 {
                continue;
            }
            batch.clear();
            match q.read_batch(&mut batch) {
                Ok(n) => {
                    for p in batch.iter() {
                        // (IPv6 router solicitations and the like come through too.)
                        if p[0] >> 4 == 4 && p[9] == 17 && p[16..20] == [10, 203, 0, 9] {
                            per_queue[i] += 1;
                        }
                    }
                    assert!(n > 0);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("read: {e}"),
            }
        }
    }
    assert_eq!(per_queue.iter().sum::<usize>(), 64, "{per_queue:?}");
    assert!(
        per_queue[0] > 0 && per_queue[1] > 0,
        "one queue got nothing: {per_queue:?}"
    );
}

/// Blocking mode: `read_batch` waits for a packet and returns it after one read.
#[test]
fn blocking_read_returns_one_packet() {
    let ns = Netns::new("fk");
    let name = format!("t{}", &ns.name()[2..]);
    let (n2, nsname) = (name.clone(), ns.name().to_string());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        enter_netns(&nsname);
        let mut tun = Tun::create(&n2, 1420, true).expect("create");
        ready_tx.send(()).unwrap();
        let mut batch = PacketBatch::new(64, 2048);
        // Skip whatever the kernel sends by itself (IPv6 router solicitations...).
        loop {
            batch.clear();
            let n = tun.read_batch(&mut batch).expect("blocking read");
            assert!(n >= 1, "a blocking read returned nothing");
            if batch.iter().any(|p| p[0] >> 4 == 4 && p[9] == 17) {
                let _ = done_tx.send(n);
                return;
            }
        }
    });
    ready_rx.recv_timeout(Duration::from_secs(10)).unwrap();
    ns.exec_ok(&["ip", "addr", "add", "10.204.0.1/24", "dev", &name]);
    std::thread::sleep(Duration::from_millis(100));
    ns.exec_ok(&["bash", "-c", "echo hi > /dev/udp/10.204.0.9/4000"]);
    let n = done_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("blocking read never returned the datagram");
    assert_eq!(n, 1, "blocking mode reads once");
}
