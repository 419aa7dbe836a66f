//! What the CLI prints: the status document and the answers to actions.

use std::fmt::Write as _;

use serde_json::Value;

use crate::admin::http::reason_phrase;

// ---------------------------------------------------------------------------
// Renderings for the CLI
// ---------------------------------------------------------------------------

/// The status document as a compact block a person reads at a glance, for
/// `nvmirror status`. Missing sections are left out; missing fields show as
/// `?`. The document the node produces:
///
/// ```json
/// {
///   "node_id": 1,
///   "state": "serving" | "waiting for giveback" | "fenced" | "starting",
///   "partner": {"node_id": 2, "interconnect": "up" | "silent", "interconnect_silent_ms": 0,
///               "mailbox": "alive" | "stale" | "missing", "mailbox_stale_ms": 0, "state": "serving"},
///   "mirror": {"link": "in sync" | "resyncing" | "down", "in_sync": true, "why_not": null,
///              "resync": {"total_bytes": 4096, "placed_bytes": 4096, "elapsed_ms": 3,
///                         "remaining_ms": 0, "finished": true} | null},
///   "takeover": {"possible": false, "why_not": "partner is alive",
///                "holding_partner_volumes": false, "forced": false},
///   "volumes": [{"name": "vol0", "volumes_of": 1, "owner": 1, "epoch": 0, "served_here": true,
///                "dirty_bytes": 0, "size_bytes": 1048576}],
///   "log": {"half_bytes": 1048576, "filling": 0, "used_percent": 3.2, "next_lsn": 10,
///           "flushed_lsn": 4, "persisted_lsn": 9,
///           "halves": [{"state": "filling", "used_bytes": 1000}, {"state": "free", "used_bytes": 0}]},
///   "replay": {"active": false, "total_bytes": 0, "done_bytes": 0, "percent": 100.0},
///   "last_takeover": {"at_unix_ms": 0, "resume_ms": 0, "replay_ms": 0, "forced": false} | null
/// }
/// ```
///
/// rendered as
///
/// ```text
/// node 1: serving            partner 2: serving (interconnect up, mailbox alive)
/// mirror: in sync
/// takeover: not possible (partner is alive)
///
/// (while a resync runs: `mirror: resyncing, 3.0 MiB of 16.0 MiB placed in
/// 1.5 s, about 6.5 s left`)
/// volumes:
///   vol0  node 1's  owner 1  epoch 0  served here  dirty 0 B  1.0 MiB
/// log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
/// replay: idle
/// ```
pub fn render_status(status: &Value) -> String {
    let mut out = String::new();
    let node_id = field(status, "node_id");
    let left = format!("node {node_id}: {}", field(status, "state"));
    match status.get("partner").filter(|p| !p.is_null()) {
        Some(partner) => {
            let interconnect = with_duration(
                field(partner, "interconnect"),
                partner,
                "interconnect_silent_ms",
            );
            let mailbox = with_duration(field(partner, "mailbox"), partner, "mailbox_stale_ms");
            let _ = writeln!(
                out,
                "{left:<26} partner {}: {} (interconnect {interconnect}, mailbox {mailbox})",
                field(partner, "node_id"),
                field(partner, "state"),
            );
        }
        None => {
            let _ = writeln!(out, "{left}");
        }
    }

    if let Some(mirror) = section(status, "mirror") {
        let _ = write!(out, "mirror: {}", field(mirror, "link"));
        if let Some(resync) = section(mirror, "resync")
            .filter(|resync| resync.get("finished") != Some(&Value::Bool(true)))
        {
            let _ = write!(
                out,
                ", {} of {} placed in {}",
                bytes_field(resync, "placed_bytes"),
                bytes_field(resync, "total_bytes"),
                duration_field(resync, "elapsed_ms"),
            );
            if let Some(left) = resync.get("remaining_ms").and_then(Value::as_u64) {
                let _ = write!(out, ", about {} left", human_duration_ms(left));
            }
        }
        if let Some(why) = text_of(mirror.get("why_not")) {
            let _ = write!(out, " ({why})");
        }
        out.push('\n');
    }

    if let Some(takeover) = section(status, "takeover") {
        out.push_str("takeover: ");
        if takeover.get("holding_partner_volumes") == Some(&Value::Bool(true)) {
            match status.get("partner").and_then(|p| p.get("node_id")) {
                Some(id) => {
                    let _ = write!(out, "holding node {}'s volumes", scalar(id));
                }
                None => out.push_str("holding the partner's volumes"),
            }
            if takeover.get("forced") == Some(&Value::Bool(true)) {
                out.push_str(" (forced)");
            }
        } else {
            match takeover.get("possible") {
                Some(Value::Bool(true)) => out.push_str("possible"),
                Some(Value::Bool(false)) => {
                    out.push_str("not possible");
                    if let Some(why) = text_of(takeover.get("why_not")) {
                        let _ = write!(out, " ({why})");
                    }
                }
                _ => out.push('?'),
            }
        }
        out.push('\n');
    }

    match status.get("volumes") {
        None | Some(Value::Null) => {}
        Some(Value::Array(volumes)) if volumes.is_empty() => out.push_str("volumes: none\n"),
        Some(Value::Array(volumes)) => {
            out.push_str("volumes:\n");
            let rows: Vec<Vec<String>> = volumes
                .iter()
                .map(|volume| {
                    vec![
                        field(volume, "name"),
                        format!("node {}'s", field(volume, "volumes_of")),
                        format!("owner {}", field(volume, "owner")),
                        format!("epoch {}", field(volume, "epoch")),
                        match volume.get("served_here") {
                            Some(Value::Bool(true)) => "served here".to_owned(),
                            Some(Value::Bool(false)) => "not served".to_owned(),
                            _ => "served ?".to_owned(),
                        },
                        format!("dirty {}", bytes_field(volume, "dirty_bytes")),
                        bytes_field(volume, "size_bytes"),
                    ]
                })
                .collect();
            write_table(&mut out, &rows, "  ");
        }
        Some(_) => out.push_str("volumes: ?\n"),
    }

    if let Some(log) = section(status, "log") {
        let used = match log.get("used_percent").and_then(Value::as_f64) {
            Some(percent) => format!("{percent:.1}%"),
            None => "?%".to_owned(),
        };
        let filling = log.get("filling").and_then(Value::as_u64);
        let _ = write!(
            out,
            "log: {used} of half {} used; next LSN {}, flushed {}, persisted {}",
            filling.map_or_else(|| "?".to_owned(), |f| f.to_string()),
            field(log, "next_lsn"),
            field(log, "flushed_lsn"),
            field(log, "persisted_lsn"),
        );
        // The other halves only when they matter: one being flushed holds
        // back writes once the filling one is full.
        if let Some(Value::Array(halves)) = log.get("halves") {
            for (index, half) in halves.iter().enumerate() {
                let state = text_of(half.get("state"));
                if Some(index as u64) == filling || state.as_deref() == Some("free") {
                    continue;
                }
                let _ = write!(
                    out,
                    "; half {index} {} {}",
                    state.unwrap_or_else(|| "?".to_owned()),
                    bytes_field(half, "used_bytes")
                );
            }
        }
        out.push('\n');
    }

    if let Some(replay) = section(status, "replay") {
        match replay.get("active") {
            Some(Value::Bool(false)) => out.push_str("replay: idle\n"),
            Some(Value::Bool(true)) => {
                let percent = match replay.get("percent").and_then(Value::as_f64) {
                    Some(percent) => format!("{percent:.1}%"),
                    None => "?%".to_owned(),
                };
                let _ = writeln!(
                    out,
                    "replay: {percent} ({} of {})",
                    bytes_field(replay, "done_bytes"),
                    bytes_field(replay, "total_bytes")
                );
            }
            _ => out.push_str("replay: ?\n"),
        }
    }

    match status.get("last_takeover") {
        None => {}
        Some(Value::Null) => out.push_str("last takeover: none\n"),
        Some(last) => {
            let at = match last.get("at_unix_ms").and_then(Value::as_u64) {
                Some(ms) => utc_from_unix_ms(ms),
                None => "?".to_owned(),
            };
            let _ = write!(
                out,
                "last takeover: {at}, resumed in {}, replay {}",
                duration_field(last, "resume_ms"),
                duration_field(last, "replay_ms")
            );
            if last.get("forced") == Some(&Value::Bool(true)) {
                out.push_str(" (forced)");
            }
            out.push('\n');
        }
    }
    out
}

/// What the CLI prints for `nvmirror takeover`, `giveback` or `fault`, given
/// [`request`]'s answer: `"takeover: <message>"` on 200, `"takeover refused
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

fn section<'a>(status: &'a Value, key: &str) -> Option<&'a Value> {
    status.get(key).filter(|v| !v.is_null())
}

/// A field as text: strings as they are (control characters replaced), other
/// values in their JSON form, `?` when missing.
fn field(object: &Value, key: &str) -> String {
    object.get(key).map_or_else(|| "?".to_owned(), scalar)
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => sanitize(text),
        Value::Null => "-".to_owned(),
        other => sanitize(&other.to_string()),
    }
}

/// A present, non-null value as text.
fn text_of(value: Option<&Value>) -> Option<String> {
    value.filter(|v| !v.is_null()).map(scalar)
}

/// Keeps a node-supplied string from moving the operator's cursor.
fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `"silent"` becomes `"silent 1.2 s"` when the duration is known and not 0.
fn with_duration(state: String, object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(ms) if ms > 0 => format!("{state} {}", human_duration_ms(ms)),
        _ => state,
    }
}

fn bytes_field(object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(bytes) => human_bytes(bytes),
        None => "? B".to_owned(),
    }
}

fn duration_field(object: &Value, key: &str) -> String {
    match object.get(key).and_then(Value::as_u64) {
        Some(ms) => human_duration_ms(ms),
        None => "?".to_owned(),
    }
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

/// "2024-05-01 12:00:00 UTC" from milliseconds since the Unix epoch.
fn utc_from_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian
/// calendar (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March first
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    // -- Rendering ---------------------------------------------------------

    fn full_status() -> Value {
        json!({
            "node_id": 1,
            "state": "serving",
            "partner": {"node_id": 2, "interconnect": "up", "interconnect_silent_ms": 0,
                        "mailbox": "alive", "mailbox_stale_ms": 0, "state": "serving"},
            "mirror": {"link": "in sync", "in_sync": true, "why_not": null},
            "takeover": {"possible": false, "why_not": "partner is alive",
                         "holding_partner_volumes": false, "forced": false},
            "volumes": [
                {"name": "vol0", "volumes_of": 1, "owner": 1, "epoch": 0, "served_here": true,
                 "dirty_bytes": 0, "size_bytes": 1_048_576},
                {"name": "database", "volumes_of": 2, "owner": 2, "epoch": 12, "served_here": false,
                 "dirty_bytes": 1536, "size_bytes": 10_737_418_240_u64}
            ],
            "log": {"half_bytes": 1_048_576, "filling": 0, "used_percent": 3.2, "next_lsn": 10,
                    "flushed_lsn": 4, "persisted_lsn": 9,
                    "halves": [{"state": "filling", "used_bytes": 1000},
                               {"state": "free", "used_bytes": 0}]},
            "replay": {"active": false, "total_bytes": 0, "done_bytes": 0, "percent": 100.0},
            "last_takeover": null
        })
    }

    #[test]
    fn renders_a_full_status() {
        let text = render_status(&full_status());
        let expected = "\
node 1: serving            partner 2: serving (interconnect up, mailbox alive)
mirror: in sync
takeover: not possible (partner is alive)
volumes:
  vol0      node 1's  owner 1  epoch 0   served here  dirty 0 B       1.0 MiB
  database  node 2's  owner 2  epoch 12  not served   dirty 1.5 KiB  10.0 GiB
log: 3.2% of half 0 used; next LSN 10, flushed 4, persisted 9
replay: idle
last takeover: none
";
        assert_eq!(text, expected, "\n{text}");
    }

    #[test]
    fn renders_a_resync_in_progress() {
        let mut status = full_status();
        status["mirror"] = json!({"link": "resyncing", "in_sync": false, "why_not": "partner restarted",
            "resync": {"total_bytes": 16_777_216_u64, "placed_bytes": 3_145_728, "elapsed_ms": 1500,
                       "remaining_ms": 6500, "finished": false}});
        let text = render_status(&status);
        assert!(
            text.contains("mirror: resyncing, 3.0 MiB of 16.0 MiB placed in 1.5 s, about 6.5 s left (partner restarted)\n"),
            "\n{text}"
        );
        // A finished resync is not news.
        status["mirror"]["resync"]["finished"] = json!(true);
        status["mirror"]["link"] = json!("in sync");
        status["mirror"]["why_not"] = json!(null);
        assert!(render_status(&status).contains("mirror: in sync\n"));
    }

    #[test]
    fn renders_a_status_after_a_forced_takeover() {
        let mut status = full_status();
        status["state"] = json!("serving");
        status["partner"]["interconnect"] = json!("silent");
        status["partner"]["interconnect_silent_ms"] = json!(4200);
        status["partner"]["mailbox"] = json!("stale");
        status["partner"]["mailbox_stale_ms"] = json!(125_000);
        status["partner"]["state"] = json!("fenced");
        status["mirror"] = json!({"link": "down", "in_sync": false, "why_not": "partner gone"});
        status["takeover"]["holding_partner_volumes"] = json!(true);
        status["takeover"]["forced"] = json!(true);
        status["log"]["filling"] = json!(1);
        status["log"]["halves"] = json!([{"state": "flushing", "used_bytes": 1_048_000},
                                         {"state": "filling", "used_bytes": 10}]);
        status["replay"] =
            json!({"active": true, "total_bytes": 4096, "done_bytes": 1024, "percent": 25.0});
        status["last_takeover"] = json!({"at_unix_ms": 1_714_564_800_123_u64, "resume_ms": 120,
                                         "replay_ms": 3400, "forced": true});
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
        assert!(text.contains("\nlast takeover: 2024-05-01 12:00:00 UTC, resumed in 120 ms, replay 3.4 s (forced)\n"), "{text}");
    }

    #[test]
    fn renders_a_status_with_fields_missing() {
        assert_eq!(render_status(&json!({})), "node ?: ?\n");
        assert_eq!(render_status(&json!(null)), "node ?: ?\n");
        assert_eq!(render_status(&json!([1, 2])), "node ?: ?\n");
        let status = json!({
            "node_id": 1,
            "state": "starting\u{1b}[2J",
            "partner": {},
            "mirror": {},
            "takeover": {"possible": "maybe"},
            "volumes": [{"name": "vol0"}, 7],
            "log": {"halves": [{}]},
            "replay": {},
            "last_takeover": {}
        });
        let text = render_status(&status);
        let expected = "\
node 1: starting?[2J       partner ?: ? (interconnect ?, mailbox ?)
mirror: ?
takeover: ?
volumes:
  vol0  node ?'s  owner ?  epoch ?  served ?  dirty ? B  ? B
  ?     node ?'s  owner ?  epoch ?  served ?  dirty ? B  ? B
log: ?% of half ? used; next LSN ?, flushed ?, persisted ?; half 0 ? ? B
replay: ?
last takeover: ?, resumed in ?, replay ?
";
        assert_eq!(text, expected, "\n{text}");
        let text =
            render_status(&json!({"node_id": 3, "volumes": [], "takeover": {"possible": true}}));
        assert_eq!(text, "node 3: ?\ntakeover: possible\nvolumes: none\n");
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
