//! The node's TOML configuration, checked as a whole before anything starts.
//!
//! ```toml
//! node_id = 1                         # 1 or 2; the partner has the other
//! data_dir = "/var/lib/nvmirror"      # holds the NVRAM file `nvram`
//! aggregate_dir = "/shared/nvmirror"  # volume files and mailboxes, reachable by both nodes
//! durability = "mirror"               # or "persist": also wait for local persistence
//! log_level = "info"                  # RUST_LOG overrides
//!
//! [nvram]
//! half_size = "32MiB"                 # each of the log's two halves
//!
//! [nbd]
//! listen = "0.0.0.0:10809"
//!
//! [[volume]]
//! name = "db"
//! size = "10GiB"
//!
//! [interconnect]
//! transport = "tcp"                   # "rdma": not in this build yet
//! listen = "10.0.0.1:7100"            # the partner mirrors into us here
//! partner = "10.0.0.2:7100"           # we mirror into the partner here
//! key = "a long random secret"        # or key_file = "/etc/nvmirror/key"
//! slots = 64
//! heartbeat_interval_ms = 100
//! heartbeat_timeout_ms = 2000
//!
//! [consistency_point]
//! interval_ms = 5000
//! threshold_percent = 50
//!
//! [ha]
//! admin_listen = "127.0.0.1:7180"     # status, metrics, takeover, giveback
//! mailbox_interval_ms = 200           # heartbeat in the mailbox on shared storage
//! mailbox_timeout_ms = 2000           # partner's mailbox unchanged this long: stale
//! auto_takeover = true
//! auto_giveback_delay_ms = 30000      # absent: giveback only by `nvmirror giveback`
//! hook = "/etc/nvmirror/move-ip.sh"   # run on takeover and giveback
//! fence_command = "fence_ipmilan ..."  # power the partner off before a takeover
//! fence_timeout_ms = 30000            # its time limit; a timeout is a failure
//! warm_index_interval_ms = 20         # index the partner's mirror this often; 0: off
//! warm_index_writeback_ms = 1000     # and start the mirror's writeback this often; 0: never
//! ```

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration problem, naming the field.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}`: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// A byte size written as a number of bytes or a string such as "64MiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(try_from = "SizeRepr")]
pub struct ByteSize(pub u64);

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<SizeRepr> for ByteSize {
    type Error = String;

    fn try_from(repr: SizeRepr) -> Result<ByteSize, String> {
        match repr {
            SizeRepr::Bytes(bytes) => Ok(ByteSize(bytes)),
            SizeRepr::Text(text) => parse_size(&text).map(ByteSize),
        }
    }
}

/// "4096", "64KiB", "32MiB", "10GiB", "1TiB" (binary units; K/M/G/T too).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a size (examples: 4096, 64KiB, 32MiB, 10GiB)"))?;
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KiB" => 10,
        "M" | "MiB" => 20,
        "G" | "GiB" => 30,
        "T" | "TiB" => 40,
        other => {
            return Err(format!(
                "unknown size unit `{other}` in `{text}` (use KiB, MiB, GiB or TiB)"
            ))
        }
    };
    number
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{text}` is too large"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge once the record is in local NVRAM and placed in the
    /// partner's mirror (two failure domains).
    Mirror,
    /// Also wait until the record is persisted locally.
    Persist,
}

impl Durability {
    pub fn as_str(&self) -> &'static str {
        match self {
            Durability::Mirror => "mirror",
            Durability::Persist => "persist",
        }
    }

    /// What an acknowledged write survives at this level (the README's
    /// durability table, in one line for the status).
    pub fn survives(&self) -> &'static str {
        match self {
            Durability::Mirror => {
                "the loss of either node; not of both at once, nor a power loss of a survivor \
                 serving its partner's volumes"
            }
            Durability::Persist => "the loss of either node or of both at once",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Tcp,
    Rdma,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node_id: u32,
    pub data_dir: PathBuf,
    pub aggregate_dir: PathBuf,
    #[serde(default = "default_durability")]
    pub durability: Durability,
    #[serde(default)]
    pub log_level: Option<String>,
    #[serde(default)]
    pub nvram: NvramConfig,
    pub nbd: NbdConfig,
    #[serde(rename = "volume", default)]
    pub volumes: Vec<VolumeConfig>,
    pub interconnect: InterconnectConfig,
    /// `[consistency_point]`; `[checkpoint]`, its earlier name, is read
    /// too.
    #[serde(default, alias = "checkpoint")]
    pub consistency_point: ConsistencyPointConfig,
    #[serde(default)]
    pub ha: HaConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// The admin endpoint (HTTP): status, metrics, takeover, giveback.
    #[serde(default)]
    pub admin_listen: Option<SocketAddr>,
    #[serde(default = "default_mailbox_interval_ms")]
    pub mailbox_interval_ms: u64,
    #[serde(default = "default_mailbox_timeout_ms")]
    pub mailbox_timeout_ms: u64,
    #[serde(default = "default_auto_takeover")]
    pub auto_takeover: bool,
    /// Give the partner's volumes back this long after it is up and waiting;
    /// absent: only on `nvmirror giveback`.
    #[serde(default)]
    pub auto_giveback_delay_ms: Option<u64>,
    /// A command run (by `sh -c`) on takeover and giveback, like keepalived's
    /// notify scripts: it can move a floating address. It gets
    /// NVMIRROR_EVENT (takeover|giveback), NVMIRROR_PARTNER and
    /// NVMIRROR_PARTNER_NBD in its environment.
    #[serde(default)]
    pub hook: Option<String>,
    /// STONITH: a shell command that powers the partner off (or kills it)
    /// and exits 0 only once it is off. A takeover of a partner that may be
    /// alive runs it first and goes on only if it succeeds, so that a
    /// stalled owner cannot wake up and write after the takeover. It gets
    /// NVMIRROR_EVENT=fence, NVMIRROR_PARTNER, NVMIRROR_PARTNER_INTERCONNECT
    /// and NVMIRROR_REASON. Absent: the takeover relies on the owner file's
    /// fence alone (see the README for what that does not cover).
    #[serde(default)]
    pub fence_command: Option<String>,
    /// How long the fence command may take; past it, it is killed and the
    /// takeover refused.
    #[serde(default = "default_fence_timeout_ms")]
    pub fence_timeout_ms: u64,
    /// Throttle of the background replay after a takeover, to leave the
    /// disks to the clients; absent: as fast as the disks go.
    #[serde(default)]
    pub replay_max_bytes_per_s: Option<ByteSize>,
    /// How often the warm index of the partner's mirror takes in what
    /// landed since its last pass (a takeover scans only the rest); 0 turns
    /// it off, and a takeover scans the whole mirror.
    #[serde(default = "default_warm_index_interval_ms")]
    pub warm_index_interval_ms: u64,
    /// How often the warm index also starts writing the mirror back to its
    /// file (without waiting for it), so that a takeover's persist has
    /// little left to wait for; 0: never (the takeover writes back all that
    /// is dirty). It costs disk writes while the partner writes (see the
    /// README's benchmarks).
    #[serde(default = "default_warm_index_writeback_ms")]
    pub warm_index_writeback_ms: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        HaConfig {
            admin_listen: None,
            mailbox_interval_ms: default_mailbox_interval_ms(),
            mailbox_timeout_ms: default_mailbox_timeout_ms(),
            auto_takeover: default_auto_takeover(),
            auto_giveback_delay_ms: None,
            hook: None,
            fence_command: None,
            fence_timeout_ms: default_fence_timeout_ms(),
            replay_max_bytes_per_s: None,
            warm_index_interval_ms: default_warm_index_interval_ms(),
            warm_index_writeback_ms: default_warm_index_writeback_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvramConfig {
    #[serde(default = "default_half_size")]
    pub half_size: ByteSize,
}

impl Default for NvramConfig {
    fn default() -> Self {
        NvramConfig {
            half_size: default_half_size(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    pub listen: SocketAddr,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    pub size: ByteSize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InterconnectConfig {
    #[serde(default = "default_transport")]
    pub transport: TransportKind,
    pub listen: SocketAddr,
    pub partner: SocketAddr,
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default = "default_slots")]
    pub slots: usize,
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_heartbeat_timeout_ms")]
    pub heartbeat_timeout_ms: u64,
    /// RDMA device name; found from the listen address when absent.
    #[serde(default)]
    pub device: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsistencyPointConfig {
    #[serde(default = "default_cp_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_cp_threshold_percent")]
    pub threshold_percent: u8,
}

impl Default for ConsistencyPointConfig {
    fn default() -> Self {
        ConsistencyPointConfig {
            interval_ms: default_cp_interval_ms(),
            threshold_percent: default_cp_threshold_percent(),
        }
    }
}

fn default_durability() -> Durability {
    Durability::Mirror
}
fn default_half_size() -> ByteSize {
    ByteSize(32 << 20)
}
fn default_transport() -> TransportKind {
    TransportKind::Tcp
}
fn default_slots() -> usize {
    64
}
fn default_heartbeat_interval_ms() -> u64 {
    100
}
fn default_heartbeat_timeout_ms() -> u64 {
    2000
}
fn default_cp_interval_ms() -> u64 {
    5000
}
fn default_cp_threshold_percent() -> u8 {
    50
}
fn default_mailbox_interval_ms() -> u64 {
    200
}
fn default_mailbox_timeout_ms() -> u64 {
    2000
}
fn default_warm_index_interval_ms() -> u64 {
    20
}
fn default_fence_timeout_ms() -> u64 {
    30_000
}

fn default_warm_index_writeback_ms() -> u64 {
    1000
}
/// A pass less often than this would leave the index too far behind to
/// matter; more likely a unit mistake (seconds for milliseconds).
const WARM_INDEX_INTERVAL_MAX_MS: u64 = 60_000;
/// A fence command that takes longer than ten minutes is broken, not slow.
const FENCE_TIMEOUT_MAX_MS: u64 = 600_000;
fn default_auto_takeover() -> bool {
    true
}

/// Volume names become file names and NBD export names.
const VOLUME_NAME_MAX: usize = 64;
/// The largest pre-shared key accepted from a file (it is a secret, not data).
const KEY_FILE_MAX_BYTES: u64 = 4096;

impl Config {
    /// Read, parse and check the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text).map_err(|error| match error {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Parse and check TOML text.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|error| ConfigError::Parse {
            path: PathBuf::from("<text>"),
            message: error.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=2).contains(&self.node_id) {
            return Err(invalid(
                "node_id",
                "must be 1 or 2 (the two nodes of the pair)",
            ));
        }
        nvlog::Geometry::new(self.nvram.half_size.0)
            .map_err(|error| invalid("nvram.half_size", error.to_string()))?;
        if self.volumes.is_empty() {
            return Err(invalid(
                "volume",
                "configure at least one [[volume]] with a name and a size",
            ));
        }
        let mut names = std::collections::HashSet::new();
        for (index, volume) in self.volumes.iter().enumerate() {
            let field = format!("volume[{index}].name");
            let name = &volume.name;
            if name.is_empty() || name.len() > VOLUME_NAME_MAX {
                return Err(invalid(
                    field,
                    format!("must be 1 to {VOLUME_NAME_MAX} characters"),
                ));
            }
            if !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                || name.starts_with('-')
            {
                return Err(invalid(
                    field,
                    format!("`{name}` may hold only letters, digits, `-` and `_`"),
                ));
            }
            if !names.insert(name) {
                return Err(invalid(field, format!("`{name}` is configured twice")));
            }
            let size = volume.size.0;
            if size == 0 || size % 512 != 0 {
                return Err(invalid(
                    format!("volume[{index}].size"),
                    format!("{size} bytes is not a positive multiple of 512"),
                ));
            }
        }
        let ic = &self.interconnect;
        if ic.transport == TransportKind::Rdma && !cfg!(feature = "rdma") {
            return Err(invalid(
                "interconnect.transport",
                "\"rdma\" needs a build with RDMA (cargo build --features rdma, with libibverbs-dev \
                 librdmacm-dev clang libclang-dev installed); use \"tcp\" with this one",
            ));
        }
        if ic.slots == 0 || ic.slots > 4096 {
            return Err(invalid("interconnect.slots", "must be between 1 and 4096"));
        }
        if ic.heartbeat_interval_ms == 0 {
            return Err(invalid(
                "interconnect.heartbeat_interval_ms",
                "must be positive",
            ));
        }
        if ic.heartbeat_timeout_ms <= ic.heartbeat_interval_ms {
            return Err(invalid(
                "interconnect.heartbeat_timeout_ms",
                format!(
                    "must exceed heartbeat_interval_ms ({})",
                    ic.heartbeat_interval_ms
                ),
            ));
        }
        if ic.listen == ic.partner {
            return Err(invalid(
                "interconnect.partner",
                "is the same address as interconnect.listen",
            ));
        }
        match (&ic.key, &ic.key_file) {
            (Some(_), Some(_)) => return Err(invalid("interconnect.key", "set either key or key_file, not both")),
            (None, None) => {
                return Err(invalid(
                    "interconnect.key",
                    "a pre-shared key is required (key = \"…\" or key_file = \"path\"), the same on both nodes",
                ))
            }
            _ => {}
        }
        let key = self.key_bytes()?;
        let key_field = if ic.key.is_some() {
            "interconnect.key"
        } else {
            "interconnect.key_file"
        };
        interconnect::PresharedKey::new(key)
            .map_err(|error| invalid(key_field, error.to_string()))?;
        if self.consistency_point.interval_ms == 0 {
            return Err(invalid("consistency_point.interval_ms", "must be positive"));
        }
        if !(1..=FENCE_TIMEOUT_MAX_MS).contains(&self.ha.fence_timeout_ms) {
            return Err(invalid(
                "ha.fence_timeout_ms",
                format!("must be between 1 and {FENCE_TIMEOUT_MAX_MS}"),
            ));
        }
        if self
            .ha
            .fence_command
            .as_deref()
            .is_some_and(|command| command.trim().is_empty())
        {
            return Err(invalid(
                "ha.fence_command",
                "is empty: leave it out, or name a command that powers the partner off",
            ));
        }
        if self.ha.warm_index_writeback_ms > WARM_INDEX_INTERVAL_MAX_MS {
            return Err(invalid(
                "ha.warm_index_writeback_ms",
                format!("must be at most {WARM_INDEX_INTERVAL_MAX_MS} (0: never)"),
            ));
        }
        if self.ha.warm_index_interval_ms > WARM_INDEX_INTERVAL_MAX_MS {
            return Err(invalid(
                "ha.warm_index_interval_ms",
                format!(
                    "must be at most {WARM_INDEX_INTERVAL_MAX_MS} (0 turns the warm index off)"
                ),
            ));
        }
        if !(1..=100).contains(&self.consistency_point.threshold_percent) {
            return Err(invalid(
                "consistency_point.threshold_percent",
                "must be between 1 and 100",
            ));
        }
        Ok(())
    }

    /// The pre-shared key, from the config or its file.
    pub fn key_bytes(&self) -> Result<Vec<u8>, ConfigError> {
        let ic = &self.interconnect;
        if let Some(key) = &ic.key {
            return Ok(key.as_bytes().to_vec());
        }
        let path = ic.key_file.as_ref().expect("validated: key or key_file");
        let metadata = std::fs::metadata(path).map_err(|error| {
            invalid(
                "interconnect.key_file",
                format!("{}: {error}", path.display()),
            )
        })?;
        // A FIFO or a terminal would block the start-up for ever, a device
        // like /dev/zero would be read until memory runs out: a key is a
        // regular file.
        if !metadata.is_file() {
            return Err(invalid(
                "interconnect.key_file",
                format!("{} is not a regular file", path.display()),
            ));
        }
        if metadata.len() > KEY_FILE_MAX_BYTES {
            return Err(invalid(
                "interconnect.key_file",
                format!(
                    "{} is larger than {KEY_FILE_MAX_BYTES} bytes",
                    path.display()
                ),
            ));
        }
        // /proc files say 0 bytes: bound the read itself too.
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|file| file.take(KEY_FILE_MAX_BYTES + 1).read_to_end(&mut bytes))
            .map_err(|error| {
                invalid(
                    "interconnect.key_file",
                    format!("{}: {error}", path.display()),
                )
            })?;
        if bytes.len() as u64 > KEY_FILE_MAX_BYTES {
            return Err(invalid(
                "interconnect.key_file",
                format!(
                    "{} is larger than {KEY_FILE_MAX_BYTES} bytes",
                    path.display()
                ),
            ));
        }
        let trimmed = bytes.trim_ascii_end();
        Ok(trimmed.to_vec())
    }

    /// The NVRAM file.
    pub fn nvram_path(&self) -> PathBuf {
        self.data_dir.join("nvram")
    }

    /// The partner's node id.
    pub fn partner_id(&self) -> u32 {
        3 - self.node_id
    }

    pub fn volume_size(&self, index: usize) -> u64 {
        self.volumes[index].size.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fixtures::MINIMAL_CONFIG;

    const GOOD: &str = MINIMAL_CONFIG;

    #[test]
    fn a_good_config_parses_with_defaults() {
        let config = Config::parse(GOOD).expect("valid");
        assert_eq!(config.volumes[0].size, ByteSize(64 << 20));
        assert_eq!(config.durability, Durability::Mirror);
        assert_eq!(config.interconnect.slots, 64);
        assert_eq!(config.nvram.half_size, ByteSize(32 << 20));
        assert_eq!(config.partner_id(), 2);
        assert_eq!(
            config.key_bytes().expect("key"),
            b"a secret of sixteen bytes or more"
        );
    }

    fn error_for(text: &str) -> String {
        Config::parse(text).expect_err("invalid config").to_string()
    }

    #[test]
    fn each_bad_field_is_named() {
        let cases = [
            (GOOD.replace("node_id = 1", "node_id = 3"), "node_id"),
            (
                GOOD.replace("\"64MiB\"", "\"64 parsecs\""),
                "unknown size unit",
            ),
            (GOOD.replace("\"64MiB\"", "1000"), "volume[0].size"),
            (
                GOOD.replace("name = \"vol0\"", "name = \"../etc\""),
                "volume[0].name",
            ),
            (
                GOOD.replace("key = \"a secret of sixteen bytes or more\"", ""),
                "interconnect.key",
            ),
            (
                GOOD.replace("a secret of sixteen bytes or more", "short"),
                "interconnect.key",
            ),
            (
                GOOD.replace("127.0.0.1:7002", "127.0.0.1:7001"),
                "interconnect.partner",
            ),
            (
                GOOD.replace(
                    "listen = \"127.0.0.1:10809\"",
                    "listen = \"not an address\"",
                ),
                "listen",
            ),
            (
                GOOD.replace("node_id = 1", "node_id = 1\nnode_idd = 2"),
                "node_idd",
            ),
            (
                format!("{GOOD}\n[consistency_point]\nthreshold_percent = 0\n"),
                "consistency_point.threshold_percent",
            ),
            (
                // The section's old name is read too.
                format!("{GOOD}\n[checkpoint]\nthreshold_percent = 0\n"),
                "consistency_point.threshold_percent",
            ),
            (
                format!("{GOOD}\n[nvram]\nhalf_size = \"1000\"\n"),
                "nvram.half_size",
            ),
            (
                GOOD.replace("[[volume]]\nname = \"vol0\"\nsize = \"64MiB\"", ""),
                "volume",
            ),
            (
                format!("{GOOD}\n[[volume]]\nname = \"vol0\"\nsize = 4096\n"),
                "configured twice",
            ),
        ];
        for (text, expected) in cases {
            let message = error_for(&text);
            assert!(
                message.contains(expected),
                "expected `{expected}` in: {message}"
            );
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64KiB"), Ok(64 << 10));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
