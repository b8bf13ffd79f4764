//! Request retransmission with exponential backoff (RFC 8489 §6.2.1, with shorter timers for checks).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Retransmission schedule of one request.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    /// First retransmission timeout; doubles after each send.
    pub rto: Duration,
    /// Total sends before giving up (the last one is followed by one more RTO of waiting).
    pub max_sends: u32,
}

impl Schedule {
    /// Requests to STUN/TURN servers: 250 ms, 6 sends (given up after 15.75 s).
    pub const SERVER: Schedule = Schedule {
        rto: Duration::from_millis(250),
        max_sends: 6,
    };
    /// Connectivity checks between peers: 100 ms, 5 sends (given up after 3.1 s).
    pub const CHECK: Schedule = Schedule {
        rto: Duration::from_millis(100),
        max_sends: 5,
    };

    /// The time from the first send until the request is given up.
    pub fn give_up_after(&self) -> Duration {
        (0..self.max_sends).map(|i| self.rto * 2u32.pow(i)).sum()
    }
}

/// What to do with a pending request when its timer fires.
#[derive(Debug, PartialEq, Eq)]
pub enum Step {
    Wait,
    Resend,
    GiveUp,
}

/// A request in flight.
#[derive(Clone, Debug)]
pub struct Pending {
    pub bytes: Vec<u8>,
    pub dst: SocketAddr,
    pub first_sent: Instant,
    pub next: Instant,
    rto: Duration,
    sends: u32,
    max_sends: u32,
}

impl Pending {
    /// A request sent (for the first time) at `now`.
    pub fn new(bytes: Vec<u8>, dst: SocketAddr, now: Instant, s: Schedule) -> Pending {
        Pending {
            bytes,
            dst,
            first_sent: now,
            next: now + s.rto,
            rto: s.rto,
            sends: 1,
            max_sends: s.max_sends,
        }
    }

    pub fn on_timer(&mut self, now: Instant) -> Step {
        if now < self.next {
            return Step::Wait;
        }
        if self.sends >= self.max_sends {
            return Step::GiveUp;
        }
        self.sends += 1;
        self.rto *= 2;
        self.next = now + self.rto;
        Step::Resend
    }

    /// How many times the request has been sent.
    pub fn sends(&self) -> u32 {
        self.sends
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_then_gives_up() {
        let t0 = Instant::now();
        let mut p = Pending::new(vec![], "1.2.3.4:5".parse().unwrap(), t0, Schedule::CHECK);
        let ms = |n| t0 + Duration::from_millis(n);
        assert_eq!(p.on_timer(ms(50)), Step::Wait);
        let mut resends = vec![];
        let mut t = 0;
        loop {
            t += 10;
            match p.on_timer(ms(t)) {
                Step::Wait => {}
                Step::Resend => resends.push(t),
                Step::GiveUp => break,
            }
        }
        assert_eq!(resends, vec![100, 300, 700, 1500]);
        assert_eq!(t, 3100);
        assert_eq!(Schedule::CHECK.give_up_after(), Duration::from_millis(3100));
    }
}
