//! Sample documents shared by unit tests, integration tests and fuzz seeds,
//! so each is written once.

use crate::config::Durability;
use crate::ha::index::{IndexEntry, TakeoverIndex};
use crate::ha::status::{
    DurabilityView, HalfView, InterconnectView, LogView, MailboxView, MirrorStatus, PartnerStatus,
    ReplayStatus, Status, TakeoverStatus, VolumeStatus, WarmIndexStatus,
};
use crate::ha::Role;
use crate::mirror::Link;
use crate::storage::extents::Source;
use crate::storage::mailbox::{MailboxState, VolumeInfo, MAILBOX_FORMAT_VERSION};

/// The smallest valid configuration: node 1, one volume, a TCP link.
pub const MINIMAL_CONFIG: &str = r#"node_id = 1
data_dir = "/tmp/a"
aggregate_dir = "/tmp/agg"
[nbd]
listen = "127.0.0.1:10809"
[[volume]]
name = "vol0"
size = "64MiB"
[interconnect]
listen = "127.0.0.1:7001"
partner = "127.0.0.1:7002"
key = "a secret of sixteen bytes or more"
"#;

/// Node 1's mailbox as it starts: out of sync, two volumes.
pub fn example_mailbox_state() -> MailboxState {
    MailboxState {
        format_version: MAILBOX_FORMAT_VERSION,
        node_id: 1,
        heartbeat_seq: 0,
        state: "starting".into(),
        mirror_in_sync: false,
        out_of_sync_reason: Some("partner unreachable".into()),
        nbd_listen: "127.0.0.1:10809".into(),
        volumes: vec![
            VolumeInfo {
                name: "vol0".into(),
                size_bytes: 64 << 20,
            },
            VolumeInfo {
                name: "db_2".into(),
                size_bytes: 1 << 30,
            },
        ],
        half_bytes: 32 << 20,
        updated_unix_ms: 0,
        boot: 1,
        in_sync_with_boot: None,
        clean_stop: false,
        asks_takeover: false,
        log_host_boot: String::new(),
    }
}

/// A takeover index of node 2's volumes with one entry of each source.
pub fn example_index() -> TakeoverIndex {
    TakeoverIndex {
        partner: 2,
        epoch: 3,
        entries: vec![
            IndexEntry {
                volume_id: 2 << 16,
                start: 0,
                len: 4096,
                lsn: 9,
                source: Source::Region { offset: 123_456 },
            },
            IndexEntry {
                volume_id: (2 << 16) | 1,
                start: 512,
                len: 1 << 20,
                lsn: 10,
                source: Source::Hole,
            },
            IndexEntry {
                volume_id: 2 << 16,
                start: 8192,
                len: 100,
                lsn: 11,
                source: Source::Zero,
            },
        ],
    }
}

/// A healthy node 1 in sync with node 2, serving one volume and showing
/// one of its partner's.
pub fn example_status() -> Status {
    Status {
        node_id: 1,
        state: Role::Serving,
        failure: None,
        handing_over_because: None,
        durability: DurabilityView {
            level: Durability::Mirror.as_str().to_owned(),
            survives: Durability::Mirror.survives().to_owned(),
        },
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
        warm_index: WarmIndexStatus {
            records: 120,
            bytes: 520_192,
            passes: 1_500,
            lag_records: 3,
            lag_bytes: 12_480,
            starts_over: 1,
            cpu_ms: 2_340,
        },
        last_takeover: None,
    }
}

/// Volume 0 (`v0`) of node `set`, `size_bytes` long, as node 1 opens it
/// after taking it over (epoch 1): a file in `aggregate`, its map empty.
pub fn taken_over_volume(
    aggregate: &std::path::Path,
    set: u32,
    size_bytes: u64,
) -> std::sync::Arc<crate::storage::volume::Volume> {
    use crate::storage::ownership::{Fence, Ownership};
    let ownership = Ownership {
        format_version: 1,
        volumes_of: set,
        owner: 1,
        epoch: 1,
        forced: false,
        log_replayed: false,
        reason: "taken over by a test".into(),
        updated_unix_ms: 0,
    };
    let fence = std::sync::Arc::new(Fence::new(aggregate, 1, &ownership));
    std::sync::Arc::new(
        crate::storage::volume::Volume::open(
            &crate::storage::disk::FileDisks,
            aggregate,
            set,
            0,
            "v0",
            size_bytes,
            fence,
        )
        .expect("a volume file in the test's aggregate"),
    )
}
