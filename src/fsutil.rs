//! Small files on shared storage, replaced atomically and durably.

use std::io::Write;
use std::path::Path;

use crate::error::{Error, Result};

/// Replace `path` with `bytes`: write a temporary file beside it, fsync,
/// rename over, fsync the directory. A reader sees the old or the new
/// content, never a mix, and after return the new content survives a crash.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    // The directory is not created here: one that has gone (a shared
    // file system lost) must fail the write, not be made anew.
    let dir = path.parent().expect("a file path has a directory");
    let mut temporary_name = path.file_name().expect("a file name").to_os_string();
    temporary_name.push(".tmp");
    let temporary = dir.join(temporary_name);
    let mut file =
        std::fs::File::create(&temporary).map_err(io("creating a temporary file for"))?;
    file.write_all(bytes).map_err(io("writing"))?;
    file.sync_all().map_err(io("syncing"))?;
    drop(file);
    std::fs::rename(&temporary, path).map_err(io("replacing"))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory of"))?;
    Ok(())
}

/// Read a small file, refusing one larger than `max_bytes`; `None` if it
/// does not exist.
pub fn read_small(path: &Path, max_bytes: u64) -> Result<Option<Vec<u8>>> {
    let io = |what: &'static str| {
        let path = path.to_owned();
        move |source| Error::Io { what, path, source }
    };
    match std::fs::metadata(path) {
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(io("reading")(source)),
        Ok(metadata) if metadata.len() > max_bytes => Err(Error::Corrupt {
            path: path.to_owned(),
            reason: format!(
                "{} bytes is more than the {max_bytes} such a file can hold",
                metadata.len()
            ),
        }),
        Ok(_) => match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(io("reading")(source)),
        },
    }
}
