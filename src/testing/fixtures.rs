//! Sample documents shared by unit tests, integration tests and fuzz seeds,
//! so each is written once.

use crate::ha::status::{
    HalfView, InterconnectView, LogView, MailboxView, MirrorStatus, PartnerStatus, ReplayStatus,
    Status, TakeoverStatus, VolumeStatus,
};
use crate::ha::Role;
use crate::mirror::Link;

/// A healthy node 1 in sync with node 2, serving one volume and showing
/// one of its partner's.
pub fn example_status() -> Status {
    Status {
        node_id: 1,
        state: Role::Serving,
        failure: None,
        partner: PartnerStatus {
            node_id: 2,
            interconnect: InterconnectView::Up,
            interconnect_silent_ms: 0,
            mailbox: MailboxView::Alive,
            mailbox_stale_ms: 0,
            state: Some("serving".to_owned()),
        },
        mirror: MirrorStatus {
            link: Link::InSync,
            in_sync: true,
            why_not: None,
            resync: None,
        },
        takeover: TakeoverStatus {
            possible: false,
            why_not: Some("partner is alive".to_owned()),
            holding_partner_volumes: false,
            forced: false,
        },
        volumes: vec![
            VolumeStatus {
                name: "vol0".to_owned(),
                volumes_of: 1,
                owner: Some(1),
                epoch: Some(0),
                served_here: true,
                dirty_bytes: 0,
                size_bytes: 1 << 20,
            },
            VolumeStatus {
                name: "database".to_owned(),
                volumes_of: 2,
                owner: Some(2),
                epoch: Some(12),
                served_here: false,
                dirty_bytes: 1536,
                size_bytes: 10 << 30,
            },
        ],
        log: LogView {
            half_bytes: 1 << 20,
            filling: 0,
            used_percent: 3.2,
            next_lsn: 10,
            flushed_lsn: 4,
            persisted_lsn: 9,
            halves: vec![
                HalfView {
                    state: "filling".to_owned(),
                    used_bytes: 1000,
                },
                HalfView {
                    state: "free".to_owned(),
                    used_bytes: 0,
                },
            ],
        },
        replay: ReplayStatus {
            active: false,
            total_bytes: 0,
            done_bytes: 0,
            percent: 100.0,
        },
        last_takeover: None,
    }
}
