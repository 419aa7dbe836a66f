//! The simulated interconnect: each node's receiver registered by its
//! interconnect address, and in-process links (interconnect::inproc) from a
//! sender's log straight into the receiver's mirror area. Writes are held
//! until the simulation delivers them, in order; it can also tear one
//! (a prefix lands, then the link dies), cut links, and partition the pair.
//!
//! Each session carries heartbeats both ways, which the simulation sends,
//! delays or loses; each end watches the other with the interconnect's own
//! [`FailureDetector`], and a session whose partner falls silent past the
//! timeout is cut, as the TCP and RDMA transports do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use crossbeam_channel::Sender;
use interconnect::inproc::{self, Delivery, InProcConfig, InProcLink};
use interconnect::{ControlEvent, FailureDetector, SharedMemory, Transport};
use parking_lot::Mutex;

use crate::clock::SharedClock;
use crate::error::Result;
use crate::mirror::transport::{Interconnect, MirrorListener};

#[derive(Debug)]
pub struct SimNet {
    /// Itself, for the listeners it hands out.
    this: std::sync::Weak<SimNet>,
    clock: SharedClock,
    heartbeat_timeout: std::time::Duration,
    state: Mutex<NetState>,
}

impl Interconnect for SimNet {
    fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Arc<dyn Transport>> {
        SimNet::connect(self, partner, local_log, events)
    }

    fn listen(
        &self,
        addr: SocketAddr,
        mirror: SharedMemory,
        _events: Sender<ControlEvent>,
    ) -> Result<Box<dyn MirrorListener>> {
        SimNet::listen(self, addr, mirror);
        let net = self.this.upgrade().expect("a SimNet lives in an Arc");
        Ok(Box::new(SimListener { net, addr }))
    }
}

/// A node's receiver on the simulated interconnect.
#[derive(Debug)]
struct SimListener {
    net: Arc<SimNet>,
    addr: SocketAddr,
}

impl MirrorListener for SimListener {
    fn session(&self) -> Option<u64> {
        self.net.session_into(self.addr)
    }

    fn shutdown(&mut self) {
        self.net.unlisten(self.addr)
    }
}

/// The two failure detectors of one session.
#[derive(Debug)]
struct Watch {
    session: u64,
    /// The receiver's, hearing the sender.
    receiver_hears: FailureDetector,
    /// The sender's, hearing the receiver.
    sender_hears: FailureDetector,
}

/// A heartbeat on its way.
#[derive(Debug)]
struct Heartbeat {
    due_ms: u64,
    /// The session's receiver address, and the session.
    into: SocketAddr,
    session: u64,
    /// Sent by the receiver (heard by the sender) or by the sender.
    from_receiver: bool,
}

#[derive(Debug, Default)]
struct NetState {
    /// Receivers by interconnect address: the mirror they write into.
    receivers: BTreeMap<SocketAddr, SharedMemory>,
    /// The live link into each receiver (a new session replaces the old).
    links: BTreeMap<SocketAddr, InProcLink>,
    partitioned: bool,
    /// Receivers that accept no new session (their node is stalled).
    deaf: std::collections::BTreeSet<SocketAddr>,
    next_session: u64,
    watches: BTreeMap<SocketAddr, Watch>,
    heartbeats: Vec<Heartbeat>,
    /// Inside [`SimNet::placing_during`]: new links place at once too.
    placing: bool,
}

impl SimNet {
    pub fn new(clock: SharedClock, heartbeat_timeout: std::time::Duration) -> Arc<SimNet> {
        Arc::new_cyclic(|this| SimNet {
            this: this.clone(),
            clock,
            heartbeat_timeout,
            state: Mutex::new(NetState::default()),
        })
    }

    /// A session from a sender's `local_log` into the receiver at
    /// `partner`. Its writes are held until a delivery step places them, so
    /// a resync takes several steps (inside [`SimNet::placing_during`] they
    /// are placed as made, like every link's).
    pub fn connect(
        &self,
        partner: SocketAddr,
        local_log: SharedMemory,
        events: Sender<ControlEvent>,
    ) -> Result<Arc<dyn Transport>> {
        let mut state = self.state.lock();
        let Some(mirror) = state.receivers.get(&partner).cloned() else {
            return Err(interconnect::Error::NotConnected.into());
        };
        if state.partitioned || state.deaf.contains(&partner) {
            return Err(interconnect::Error::NotConnected.into());
        }
        state.next_session += 1;
        let (transport, link) = inproc::link(
            local_log,
            mirror,
            InProcConfig {
                delivery: if state.placing {
                    Delivery::Immediate
                } else {
                    Delivery::Manual
                },
                session: state.next_session,
                events: Some(events),
                ..InProcConfig::default()
            },
        );
        if let Some(old) = state.links.insert(partner, link) {
            old.cut();
        }
        let now = self.clock.now();
        let session = state.next_session;
        state.watches.insert(
            partner,
            Watch {
                session,
                receiver_hears: FailureDetector::new(self.heartbeat_timeout, now),
                sender_hears: FailureDetector::new(self.heartbeat_timeout, now),
            },
        );
        Ok(transport)
    }

    pub fn listen(&self, addr: SocketAddr, mirror: SharedMemory) {
        self.state.lock().receivers.insert(addr, mirror);
    }

    /// The receiver at `addr` stops: its session is cut.
    pub fn unlisten(&self, addr: SocketAddr) {
        let mut state = self.state.lock();
        state.receivers.remove(&addr);
        if let Some(link) = state.links.remove(&addr) {
            link.cut();
        }
    }

    /// Cut the session into `addr` (its sender died, or the failure
    /// detector gave up on it).
    pub fn cut_into(&self, addr: SocketAddr) {
        let link = self.state.lock().links.remove(&addr);
        if let Some(link) = link {
            link.cut();
        }
    }

    /// Whether the receiver at `addr` refuses new sessions.
    pub fn set_deaf(&self, addr: SocketAddr, deaf: bool) {
        let mut state = self.state.lock();
        if deaf {
            state.deaf.insert(addr);
        } else {
            state.deaf.remove(&addr);
        }
    }

    /// The session into `addr`, if one is up.
    pub fn session_into(&self, addr: SocketAddr) -> Option<u64> {
        let state = self.state.lock();
        state
            .links
            .get(&addr)
            .filter(|link| !link.is_cut())
            .map(|link| link.session())
    }

    /// Node with receiver `own` and partner `partner` sends a heartbeat on
    /// each of its sessions: as the sender of the session into `partner`,
    /// as the receiver of the session into `own`. `delay_ms` says when each
    /// arrives (`None`: lost).
    pub fn send_heartbeats(
        &self,
        own: SocketAddr,
        partner: SocketAddr,
        now_ms: u64,
        mut delay_ms: impl FnMut() -> Option<u64>,
    ) {
        let mut state = self.state.lock();
        for (into, from_receiver) in [(partner, false), (own, true)] {
            let Some(session) = state.watches.get(&into).map(|w| w.session) else {
                continue;
            };
            if let Some(delay) = delay_ms() {
                state.heartbeats.push(Heartbeat {
                    due_ms: now_ms + delay,
                    into,
                    session,
                    from_receiver,
                });
            }
        }
    }

    /// Deliver the heartbeats due at `now_ms`, then cut every session whose
    /// partner has been silent past the timeout. Returns what was cut.
    pub fn check_silence(&self, now_ms: u64) -> Vec<String> {
        let now = self.clock.now();
        let mut cut = Vec::new();
        let mut state = self.state.lock();
        let state = &mut *state;
        let (due, later): (Vec<_>, Vec<_>) = std::mem::take(&mut state.heartbeats)
            .into_iter()
            .partition(|heartbeat| heartbeat.due_ms <= now_ms);
        state.heartbeats = later;
        for heartbeat in due {
            if let Some(watch) = state.watches.get_mut(&heartbeat.into) {
                if watch.session == heartbeat.session {
                    if heartbeat.from_receiver {
                        watch.sender_hears.heard(now);
                    } else {
                        watch.receiver_hears.heard(now);
                    }
                }
            }
        }
        let silent: Vec<SocketAddr> = state
            .watches
            .iter_mut()
            .filter_map(|(addr, watch)| {
                let receiver = watch.receiver_hears.check(now);
                let sender = watch.sender_hears.check(now);
                (receiver.is_some() || sender.is_some()).then_some(*addr)
            })
            .collect();
        for addr in silent {
            state.watches.remove(&addr);
            if let Some(link) = state.links.remove(&addr) {
                link.cut();
                cut.push(format!(
                    "session into {addr} silent past the heartbeat timeout: cut"
                ));
            }
        }
        cut
    }

    /// From now on, writes on every live link wait for `deliver_next`.
    pub fn hold_writes(&self) {
        let mut state = self.state.lock();
        state.placing = false;
        for link in state.links.values() {
            link.set_delivery(Delivery::Manual);
        }
    }

    /// Run a step that waits for its own mirror posts (a consistency
    /// point, a giveback): everything held is placed first, and the step's
    /// posts are placed as they are made, as the NIC would while the step's
    /// thread waits. Writes are held again afterwards.
    pub fn placing_during<R>(&self, step: impl FnOnce() -> R) -> R {
        let links: Vec<InProcLink> = {
            let mut state = self.state.lock();
            state.placing = true;
            state.links.values().cloned().collect()
        };
        for link in &links {
            link.deliver_all();
            link.set_delivery(Delivery::Immediate);
        }
        let result = step();
        self.hold_writes();
        result
    }

    /// Writes held on the link into `addr`.
    pub fn pending(&self, addr: SocketAddr) -> usize {
        self.state
            .lock()
            .links
            .get(&addr)
            .map_or(0, |l| l.pending())
    }

    /// Place the oldest held write into `addr`'s mirror.
    pub fn deliver_next(&self, addr: SocketAddr) -> bool {
        let link = self.state.lock().links.get(&addr).cloned();
        link.is_some_and(|link| link.deliver_next())
    }

    /// Place every held write into `addr`'s mirror.
    pub fn deliver_all(&self, addr: SocketAddr) -> usize {
        let link = self.state.lock().links.get(&addr).cloned();
        link.map_or(0, |link| link.deliver_all())
    }

    /// Tear the oldest held write into `addr`: `keep_bytes` of it land.
    pub fn tear_next(&self, addr: SocketAddr, keep_bytes: u64) -> bool {
        let link = self.state.lock().links.get(&addr).cloned();
        link.is_some_and(|link| link.tear_next(keep_bytes))
    }

    /// Cut every link and refuse new ones until [`SimNet::heal`].
    pub fn partition(&self) {
        let links: Vec<InProcLink> = {
            let mut state = self.state.lock();
            state.partitioned = true;
            std::mem::take(&mut state.links).into_values().collect()
        };
        for link in links {
            link.cut();
        }
    }

    pub fn heal(&self) {
        self.state.lock().partitioned = false;
    }

    pub fn is_partitioned(&self) -> bool {
        self.state.lock().partitioned
    }
}
