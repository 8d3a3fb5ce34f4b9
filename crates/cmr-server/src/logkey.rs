//! The log key file: the Ed25519 key that signs checkpoints, kept outside the data folder, readable only
//! by its owner (mode 0600). Its format is the C2SP signer key (`PRIVATE+KEY+name+keyid+base64`).

use std::path::Path;

use cmr_core::keys::SigningKey;
use cmr_log::note::{NoteSigner, TYPE_ED25519};
use thiserror::Error;

/// The log key could not be created or loaded.
#[derive(Debug, Error)]
pub enum LogKeyError {
    /// Reading or writing the file failed.
    #[error("log key file: {0}")]
    Io(#[from] std::io::Error),
    /// The file is readable or writable by others than its owner.
    #[error("log key file {0} must be readable only by its owner (mode 0600)")]
    Permissions(String),
    /// The file is inside the data folder.
    #[error("the log key must be kept outside the data folder")]
    InsideDataFolder,
    /// The file does not hold a signer key.
    #[error("log key file: {0}")]
    Format(String),
}

fn outside(key: &Path, data: Option<&Path>) -> Result<(), LogKeyError> {
    // A store in a database has no data folder to keep the key out of.
    let Some(data) = data else {
        return Ok(());
    };
    let key = std::path::absolute(key)?;
    let data = std::path::absolute(data)?;
    if key.starts_with(&data) {
        return Err(LogKeyError::InsideDataFolder);
    }
    Ok(())
}

/// Creates a new log key named `name` (the log's origin) at `path`, with mode 0600; never inside the
/// data folder `data` (for a store on sled).
pub fn create(path: &Path, data: Option<&Path>, name: &str) -> Result<NoteSigner, LogKeyError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    outside(path, data)?;
    let signer = NoteSigner::new(name, TYPE_ED25519, SigningKey::generate(&mut rand::rng()))
        .map_err(|e| LogKeyError::Format(e.to_string()))?;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    options.mode(0o600);
    let mut file = options.open(path)?;
    file.write_all(signer.to_skey().as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()?;
    Ok(signer)
}

/// Loads the log key from `path`, refusing a file others can read or one inside the data folder `data`
/// (for a store on sled).
pub fn load(path: &Path, data: Option<&Path>) -> Result<NoteSigner, LogKeyError> {
    outside(path, data)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(LogKeyError::Permissions(path.display().to_string()));
        }
    }
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path)?);
    NoteSigner::from_skey(text.trim()).map_err(|e| LogKeyError::Format(e.to_string()))
}
