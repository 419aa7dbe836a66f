//! What the CLI prints: the status document and the answers to actions.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use crate::admin::response::reason_phrase;
use crate::ha::status::Status;

/// The status document as a compact block a person reads at a glance, for
/// `nvmirror status`:
///
/// ```text
/// node 1: serving            partner 2: serving (interconnect up, mailbox alive)
/// durability: persist (survives the loss of either node or of both at once)
/// mirror: in sync
/// takeover: not possible (partner is alive)
/// volumes:
///   vol0  node 1's  owner 1  epoch 0  served here  dirty 0 B  1.0 MiB
/// log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
/// replay: idle
/// warm index: 120 records (508.0 KiB) of node 2's log; 3 behind at the last pass; 2.3 s of CPU
/// last takeover: none
/// ```
///
/// (while a resync runs: `mirror: resyncing, 3.0 MiB of 16.0 MiB placed in
/// 1.5 s, about 6.5 s left`). Text the node supplies (names, reasons) has
/// its control characters replaced.
pub fn render_status(status: &Status) -> String {
    let mut out = String::new();
    let left = format!("node {}: {}", status.node_id, status.state.as_str());
    let partner = &status.partner;
    let _ = writeln!(
        out,
        "{left:<26} partner {}: {} (interconnect {}, mailbox {})",
        partner.node_id,
        partner
            .state
            .as_deref()
            .map_or_else(|| "-".to_owned(), sanitize),
        with_duration(
            interconnect_word(partner.interconnect),
            partner.interconnect_silent_ms
        ),
        with_duration(mailbox_word(partner.mailbox), partner.mailbox_stale_ms),
    );
    if let Some(why) = &status.handing_over_because {
        let _ = writeln!(
            out,
            "handing over: {}; waiting for the partner to take over and give back \
             (`nvmirror recover --force` recovers from this node's log instead)",
            sanitize(why)
        );
    }
    if let Some(failure) = &status.failure {
        let _ = writeln!(out, "failed: {}", sanitize(failure));
    }
    if !status.durability.level.is_empty() {
        let _ = writeln!(
            out,
            "durability: {} (survives {})",
            sanitize(&status.durability.level),
            sanitize(&status.durability.survives)
        );
    }

    let mirror = &status.mirror;
    let _ = write!(out, "mirror: {}", mirror.link.as_str());
    if let Some(resync) = mirror.resync.as_ref().filter(|resync| !resync.finished) {
        let _ = write!(
            out,
            ", {} of {} placed in {}",
            human_bytes(resync.placed_bytes),
            human_bytes(resync.total_bytes),
            human_duration_ms(resync.elapsed_ms),
        );
        if let Some(left) = resync.remaining_ms {
            let _ = write!(out, ", about {} left", human_duration_ms(left));
        }
    }
    if let Some(why) = &mirror.why_not {
        let _ = write!(out, " ({})", sanitize(why));
    }
    out.push('\n');

    let takeover = &status.takeover;
    if takeover.holding_partner_volumes {
        let _ = write!(out, "takeover: holding node {}'s volumes", partner.node_id);
        if takeover.forced {
            out.push_str(" (forced)");
        }
    } else if takeover.possible {
        out.push_str("takeover: possible");
    } else {
        out.push_str("takeover: not possible");
        if let Some(why) = &takeover.why_not {
            let _ = write!(out, " ({})", sanitize(why));
        }
    }
    out.push('\n');

    if status.volumes.is_empty() {
        out.push_str("volumes: none\n");
    } else {
        out.push_str("volumes:\n");
        let unknown = || "?".to_owned();
        let rows: Vec<Vec<String>> = status
            .volumes
            .iter()
            .map(|volume| {
                vec![
                    sanitize(&volume.name),
                    format!("node {}'s", volume.volumes_of),
                    format!(
                        "owner {}",
                        volume.owner.map_or_else(unknown, |o| o.to_string())
                    ),
                    format!(
                        "epoch {}",
                        volume.epoch.map_or_else(unknown, |e| e.to_string())
                    ),
                    if volume.served_here {
                        "served here"
                    } else {
                        "not served"
                    }
                    .to_owned(),
                    format!("dirty {}", human_bytes(volume.dirty_bytes)),
                    human_bytes(volume.size_bytes),
                ]
            })
            .collect();
        write_table(&mut out, &rows, "  ");
    }

    let log = &status.log;
    let _ = write!(
        out,
        "log: {:.1}% of half {} used; next LSN {}, flushed {}, persisted {}",
        log.used_percent, log.filling, log.next_lsn, log.flushed_lsn, log.persisted_lsn,
    );
    // The other halves only when they matter: one being flushed holds back
    // writes once the filling one is full.
    for (index, half) in log.halves.iter().enumerate() {
        if index == log.filling || half.state == "free" {
            continue;
        }
        let _ = write!(
            out,
            "; half {index} {} {}",
            sanitize(&half.state),
            human_bytes(half.used_bytes)
        );
    }
    out.push('\n');

    let replay = &status.replay;
    if replay.active {
        let _ = writeln!(
            out,
            "replay: {:.1}% ({} of {})",
            replay.percent,
            human_bytes(replay.done_bytes),
            human_bytes(replay.total_bytes)
        );
    } else {
        out.push_str("replay: idle\n");
    }

    let warm = &status.warm_index;
    let _ = writeln!(
        out,
        "warm index: {} records ({}) of node {}'s log; {} behind at the last pass; {} of CPU",
        warm.records,
        human_bytes(warm.bytes),
        status.partner.node_id,
        warm.lag_records,
        human_duration_ms(warm.cpu_ms)
    );

    match &status.last_takeover {
        None => out.push_str("last takeover: none\n"),
        Some(last) => {
            let _ = write!(
                out,
                "last takeover: {}, resumed in {}, replay {}",
                utc_from_unix_ms(last.at_unix_ms),
                human_duration_ms(last.resume_ms),
                last.replay_ms
                    .map_or_else(|| "running".to_owned(), human_duration_ms)
            );
            if last.forced {
                out.push_str(" (forced)");
            }
            if last.cold {
                out.push_str(", whole mirror scanned");
            } else {
                let _ = write!(out, ", {} records scanned at takeover", last.tail_records);
            }
            out.push('\n');
        }
    }
    out
}

fn interconnect_word(view: crate::ha::status::InterconnectView) -> &'static str {
    use crate::ha::status::InterconnectView;
    match view {
        InterconnectView::Up => "up",
        InterconnectView::Silent => "silent",
    }
}

fn mailbox_word(view: crate::ha::status::MailboxView) -> &'static str {
    use crate::ha::status::MailboxView;
    match view {
        MailboxView::Alive => "alive",
        MailboxView::Stale => "stale",
        MailboxView::Missing => "missing",
    }
}

/// `"silent"` becomes `"silent 1.2 s"` when the duration is not 0.
fn with_duration(state: &str, ms: u64) -> String {
    if ms > 0 {
        format!("{state} {}", human_duration_ms(ms))
    } else {
        state.to_owned()
    }
}

/// The status body of `GET /status` for [`render_status`]; a body that is
/// not a status document (a node of another version, say) is an error that
/// says so, with the body's start.
pub fn parse_status(body: &str) -> Result<Status, String> {
    serde_json::from_str(body).map_err(|error| {
        let start: String = body.chars().take(200).collect();
        format!(
            "the node's status document does not read as this version's ({error}); it begins: {}",
            sanitize(&start)
        )
    })
}

/// What the CLI prints for `nvmirror takeover`, `giveback` or `fault`, given
/// [`request`](crate::admin::client::request)'s answer: `"takeover: <message>"` on 200, `"takeover refused
/// (409 Conflict): <message>"` otherwise.
pub fn render_action(action: &str, status: u16, body: &str) -> String {
    let message = sanitize(body.trim_end());
    if status == 200 {
        format!("{action}: {message}\n")
    } else {
        let phrase = reason_phrase(status);
        let code = if phrase.is_empty() {
            status.to_string()
        } else {
            format!("{status} {phrase}")
        };
        format!("{action} refused ({code}): {message}\n")
    }
}

/// Keeps a node-supplied string from moving the operator's cursor.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Rows of cells, each column padded to its widest cell, joined by `gap`,
/// indented by two spaces.
fn write_table(out: &mut String, rows: &[Vec<String>], gap: &str) {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|row| row.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = String::from("  ");
        for (c, cell) in row.iter().enumerate() {
            if c > 0 {
                line.push_str(gap);
            }
            // The last column (sizes) right-aligned, the others left.
            if c + 1 == columns {
                let _ = write!(line, "{cell:>width$}", width = widths[c]);
            } else {
                let _ = write!(line, "{cell:<width$}", width = widths[c]);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
}

/// Bytes in binary units: "0 B", "512 B", "1.0 KiB", "1.5 MiB".
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// Milliseconds for a person: "120 ms", "3.4 s", "2 min 5 s", "1 h 3 min".
pub fn human_duration_ms(ms: u64) -> String {
    match ms {
        0..=999 => format!("{ms} ms"),
        1_000..=59_999 => format!("{:.1} s", ms as f64 / 1000.0),
        60_000..=3_599_999 => format!("{} min {} s", ms / 60_000, ms % 60_000 / 1000),
        _ => format!("{} h {} min", ms / 3_600_000, ms % 3_600_000 / 60_000),
    }
}

/// "2024-05-01 12:00:00 UTC" from milliseconds since the Unix epoch (`?`
/// past the year 9999).
fn utc_from_unix_ms(ms: u64) -> String {
    const YEAR_10000_MS: u64 = 253_402_300_800_000;
    if ms >= YEAR_10000_MS {
        return "?".to_owned();
    }
    let at = SystemTime::UNIX_EPOCH + Duration::from_millis(ms);
    // "2024-05-01T12:00:00Z", in the form the rest of the status uses.
    let rfc3339 = humantime::format_rfc3339_seconds(at).to_string();
    format!(
        "{} UTC",
        rfc3339.trim_end_matches('Z').replacen('T', " ", 1)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ha::status::{
        HalfView, InterconnectView, LastTakeover, MailboxView, ReplayStatus, ResyncStatus,
    };
    use crate::ha::Role;
    use crate::mirror::Link;
    use crate::testing::fixtures::example_status;

    #[test]
    fn renders_a_full_status() {
        let text = render_status(&example_status());
        let expected = "\
node 1: serving            partner 2: serving (interconnect up, mailbox alive)
durability: mirror (survives the loss of either node; not of both at once, nor a power loss of a survivor serving its partner's volumes)
mirror: in sync
takeover: not possible (partner is alive)
volumes:
  vol0      node 1's  owner 1  epoch 0   served here  dirty 0 B       1.0 MiB
  database  node 2's  owner 2  epoch 12  not served   dirty 1.5 KiB  10.0 GiB
log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
replay: idle
warm index: 120 records (508.0 KiB) of node 2's log; 3 behind at the last pass; 2.3 s of CPU
last takeover: none
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn renders_a_resync_in_progress() {
        let mut status = example_status();
        status.mirror.link = Link::Resyncing;
        status.mirror.in_sync = false;
        status.mirror.why_not = Some("partner restarted".to_owned());
        status.mirror.resync = Some(ResyncStatus {
            total_bytes: 16 << 20,
            placed_bytes: 3 << 20,
            elapsed_ms: 1500,
            remaining_ms: Some(6500),
            finished: false,
        });
        let text = render_status(&status);
        assert!(
            text.contains("mirror: resyncing, 3.0 MiB of 16.0 MiB placed in 1.5 s, about 6.5 s left (partner restarted)\n"),
            "\n{text}"
        );
        // A finished resync is not news.
        status.mirror.resync.as_mut().unwrap().finished = true;
        status.mirror.link = Link::InSync;
        status.mirror.why_not = None;
        assert!(render_status(&status).contains("mirror: in sync\n"));
    }

    #[test]
    fn renders_a_status_after_a_forced_takeover() {
        let mut status = example_status();
        status.partner.interconnect = InterconnectView::Silent;
        status.partner.interconnect_silent_ms = 4200;
        status.partner.mailbox = MailboxView::Stale;
        status.partner.mailbox_stale_ms = 125_000;
        status.partner.state = Some("fenced".to_owned());
        status.mirror.link = Link::Down;
        status.mirror.in_sync = false;
        status.mirror.why_not = Some("partner gone".to_owned());
        status.takeover.holding_partner_volumes = true;
        status.takeover.forced = true;
        status.log.filling = 1;
        status.log.halves = vec![
            HalfView {
                state: "flushing".to_owned(),
                used_bytes: 1_048_000,
            },
            HalfView {
                state: "filling".to_owned(),
                used_bytes: 10,
            },
        ];
        status.replay = ReplayStatus {
            active: true,
            total_bytes: 4096,
            done_bytes: 1024,
            percent: 25.0,
        };
        status.last_takeover = Some(LastTakeover {
            at_unix_ms: 1_714_564_800_123,
            resume_ms: 120,
            first_read_ms: Some(130),
            replay_ms: Some(3400),
            forced: true,
            tail_records: 7,
            tail_bytes: 28_672,
            cold: false,
        });
        let text = render_status(&status);
        assert!(
            text.contains("partner 2: fenced (interconnect silent 4.2 s, mailbox stale 2 min 5 s)"),
            "{text}"
        );
        assert!(text.contains("\nmirror: down (partner gone)\n"), "{text}");
        assert!(
            text.contains("\ntakeover: holding node 2's volumes (forced)\n"),
            "{text}"
        );
        assert!(text.contains("log: 3.2% of half 1 used; next LSN 10, flushed 4, persisted 9; half 0 flushing 1023.4 KiB\n"), "{text}");
        assert!(
            text.contains("\nreplay: 25.0% (1.0 KiB of 4.0 KiB)\n"),
            "{text}"
        );
        assert!(text.contains("\nlast takeover: 2024-05-01 12:00:00 UTC, resumed in 120 ms, replay 3.4 s (forced), 7 records scanned at takeover\n"), "{text}");
    }

    #[test]
    fn node_supplied_text_cannot_move_the_cursor() {
        let mut status = example_status();
        status.state = Role::Starting;
        status.volumes[0].name = "vol0\u{1b}[2J".to_owned();
        status.failure = Some("disk\rgone".to_owned());
        let text = render_status(&status);
        assert!(text.contains("  vol0?[2J  "), "{text}");
        assert!(text.contains("\nfailed: disk?gone\n"), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'));
    }

    #[test]
    fn a_document_of_another_shape_is_reported_not_guessed() {
        let body = serde_json::to_string(&example_status()).unwrap();
        assert_eq!(parse_status(&body).unwrap(), example_status());
        for bad in [
            "{}",
            "null",
            "[1, 2]",
            "{\"node_id\": 1, \"state\": \"dancing\"}",
        ] {
            let error = parse_status(bad).unwrap_err();
            assert!(error.contains("does not read as this version's"), "{error}");
            assert!(error.ends_with(bad), "{error}");
        }
    }

    #[test]
    fn renders_actions() {
        assert_eq!(
            render_action("takeover", 200, "took over node 2's volumes\n"),
            "takeover: took over node 2's volumes\n"
        );
        assert_eq!(
            render_action("takeover", 409, "partner is alive\n"),
            "takeover refused (409 Conflict): partner is alive\n"
        );
        assert_eq!(render_action("fault", 422, "x"), "fault refused (422): x\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.0 KiB");
        assert_eq!(human_bytes(1_048_576), "1.0 MiB");
        assert_eq!(human_bytes(u64::MAX), "16.0 EiB");
        assert_eq!(human_duration_ms(999), "999 ms");
        assert_eq!(human_duration_ms(1000), "1.0 s");
        assert_eq!(human_duration_ms(3_600_000), "1 h 0 min");
        assert_eq!(utc_from_unix_ms(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_from_unix_ms(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(
            utc_from_unix_ms(1_709_251_199_000),
            "2024-02-29 23:59:59 UTC"
        );
        assert_eq!(
            utc_from_unix_ms(4_102_444_800_000),
            "2100-01-01 00:00:00 UTC"
        );
        // Does not panic at the extreme.
        let _ = utc_from_unix_ms(u64::MAX);
    }
}
