//! The node's libp2p identity: an ed25519 keypair generated once and kept in a key file, so the
//! node's `PeerId` (and so its address) stays the same across restarts.

use std::io::Write;
use std::path::{Path, PathBuf};

use libp2p::identity::Keypair;

use crate::error::P2PError;

/// The key file for `peer_id` under `dir`. `peer_id` is a validated name, so it is a plain
/// file name.
pub(crate) fn key_path(dir: &Path, peer_id: &str) -> PathBuf {
    dir.join(format!("{peer_id}.p2p-key"))
}

/// Loads the keypair from `path`, or generates one and writes it there (mode 0600, written to a
/// temporary file and renamed so a crash never leaves half a key).
pub(crate) fn load_or_create(path: &Path) -> Result<Keypair, P2PError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            Keypair::from_protobuf_encoding(&bytes).map_err(|source| P2PError::KeyDecode {
                path: path.to_owned(),
                source,
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let keypair = Keypair::generate_ed25519();
            let bytes = keypair
                .to_protobuf_encoding()
                .map_err(|source| P2PError::KeyDecode {
                    path: path.to_owned(),
                    source,
                })?;
            write_private(path, &bytes).map_err(|source| P2PError::KeyFile {
                path: path.to_owned(),
                source,
            })?;
            Ok(keypair)
        }
        Err(source) => Err(P2PError::KeyFile {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes the key file whole or not at all, owner-only. The same steps as
/// `ksync_storage_file::write_file_durably`, kept apart on purpose: transports depend on
/// `ksync-core` only (storage is the application's choice, and `ksync-core` does no IO), so
/// sharing these lines would make every P2P user build the file storage.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("p2p-key.tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    // The rename is durable only once the directory is: without this a power loss could
    // bring back no key, and the node would come up under another PeerId.
    #[cfg(unix)]
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_is_created_once_and_reloaded() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = key_path(dir.path(), "peer-a");
        let first = load_or_create(&path).expect("create");
        let again = load_or_create(&path).expect("reload");
        assert_eq!(first.public().to_peer_id(), again.public().to_peer_id());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn damaged_key_is_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = key_path(dir.path(), "peer-b");
        std::fs::write(&path, b"not a key").expect("write");
        assert!(matches!(
            load_or_create(&path),
            Err(P2PError::KeyDecode { .. })
        ));
    }
}
