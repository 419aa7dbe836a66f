//! Which shared file systems the fence can rely on.
//!
//! The fence (the owner file) and the mailboxes work only if a node sees
//! the other node's change of a file at its next look: a `stat` must not
//! answer from a cache. Local and block-device file systems (ext4, xfs on
//! a shared LUN with one writer per file, as here) do. NFS and SMB clients
//! cache attributes for seconds by default, so a stale owner would keep
//! writing after a takeover; they are refused unless that cache is off
//! (`actimeo=0` or `noac` for NFS, `actimeo=0` for SMB).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Refuse `aggregate_dir` if it lies on a network file system whose mount
/// lets a node see a stale owner file.
pub fn check(aggregate_dir: &Path) -> Result<()> {
    let path = std::fs::canonicalize(aggregate_dir).map_err(|source| Error::Io {
        what: "resolving the aggregate directory",
        path: aggregate_dir.to_owned(),
        source,
    })?;
    let mountinfo =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| Error::Io {
            what: "reading the mount table",
            path: PathBuf::from("/proc/self/mountinfo"),
            source,
        })?;
    let Some(mount) = mount_of(&mountinfo, &path) else {
        return Ok(()); // Not in the table (a chroot): nothing to judge.
    };
    judge(&mount).map_err(|why| Error::UnsafeSharedStorage {
        path: aggregate_dir.to_owned(),
        fstype: mount.fstype.clone(),
        why,
    })
}

/// One line of /proc/self/mountinfo, the parts that matter here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fstype: String,
    /// Per-mount and per-superblock options together.
    pub options: Vec<String>,
}

/// The mount that holds `path` (absolute, resolved): the longest mount
/// point that is a prefix of it; the last such line wins (mounted over).
pub fn mount_of(mountinfo: &str, path: &Path) -> Option<Mount> {
    let mut best: Option<Mount> = None;
    for line in mountinfo.lines() {
        let Some(mount) = parse_line(line) else {
            continue;
        };
        if !path.starts_with(&mount.mount_point) {
            continue;
        }
        let longer = best.as_ref().map_or(true, |best| {
            mount.mount_point.as_os_str().len() >= best.mount_point.as_os_str().len()
        });
        if longer {
            best = Some(mount);
        }
    }
    best
}

fn parse_line(line: &str) -> Option<Mount> {
    let (before, after) = line.split_once(" - ")?;
    let fields: Vec<&str> = before.split(' ').collect();
    let mount_point = unescape(fields.get(4)?);
    let mount_options = fields.get(5)?;
    let mut after = after.split(' ');
    let fstype = after.next()?.to_owned();
    let _source = after.next()?;
    let super_options = after.next().unwrap_or("");
    let options = mount_options
        .split(',')
        .chain(super_options.split(','))
        .filter(|option| !option.is_empty())
        .map(str::to_owned)
        .collect();
    Some(Mount {
        mount_point: PathBuf::from(mount_point),
        fstype,
        options,
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let digits = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(digits, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why `mount` cannot carry the fence, if it cannot.
pub fn judge(mount: &Mount) -> std::result::Result<(), String> {
    let has = |wanted: &str| mount.options.iter().any(|option| option == wanted);
    let zero = |name: &str| has(&format!("{name}=0"));
    match mount.fstype.as_str() {
        "nfs" | "nfs4" => {
            if has("noac") || zero("actimeo") || (zero("acregmax") && zero("acdirmax")) {
                Ok(())
            } else {
                Err(
                    "the NFS client caches file attributes (for up to a minute by default), so a \
                     node could miss a takeover's change of the owner file and write on: mount \
                     it with actimeo=0 (or noac)"
                        .to_owned(),
                )
            }
        }
        "cifs" | "smb3" => {
            if zero("actimeo") || zero("acregmax") {
                Ok(())
            } else {
                Err(
                    "the SMB client caches file attributes (1 s by default), so a node could \
                     miss a takeover's change of the owner file and write on: mount it with \
                     actimeo=0"
                        .to_owned(),
                )
            }
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 22 0:38 / /srv/aggregate rw,relatime shared:20 - nfs4 filer:/export rw,vers=4.2,rsize=1048576,acregmin=3,acregmax=60,hard,proto=tcp
41 22 0:39 / /srv/fenced\\040pair rw,relatime shared:21 - nfs filer:/pair rw,vers=3,acregmin=0,acregmax=0,acdirmin=0,acdirmax=0
42 22 0:40 / /srv/smb rw,relatime - cifs //filer/pair rw,vers=3.1.1,actimeo=1
";

    #[test]
    fn the_longest_mount_point_holds_the_path() {
        let mount = mount_of(MOUNTINFO, Path::new("/srv/aggregate/pair1")).expect("mount");
        assert_eq!(mount.mount_point, Path::new("/srv/aggregate"));
        assert_eq!(mount.fstype, "nfs4");
        let root = mount_of(MOUNTINFO, Path::new("/srv/aggregated")).expect("mount");
        assert_eq!(root.fstype, "ext4", "a prefix of the name is not a parent");
        let escaped = mount_of(MOUNTINFO, Path::new("/srv/fenced pair/a")).expect("mount");
        assert_eq!(escaped.mount_point, Path::new("/srv/fenced pair"));
    }

    #[test]
    fn nfs_and_smb_with_attribute_caches_are_refused_and_without_them_accepted() {
        let judge_path = |path: &str| judge(&mount_of(MOUNTINFO, Path::new(path)).expect("mount"));
        let why = judge_path("/srv/aggregate").expect_err("default NFS caches attributes");
        assert!(why.contains("actimeo=0"), "{why}");
        judge_path("/srv/fenced pair").expect("actimeo=0 shows as ac*=0");
        assert!(judge_path("/srv/smb").is_err());
        judge_path("/var/lib").expect("local ext4");
    }
}
