//! The customer's devices: list, revoke, back up the keys, and the directory.

use super::*;

/// Runs a command of this group for the loaded customer.
pub(super) async fn step(l: &mut Loaded, out: Out, cmd: CustomerCmd) -> CliResult {
    let t = now();
    let c = &mut l.customer;
    match cmd {
        CustomerCmd::Device {
            cmd: DeviceCmd::Add { request, out: file },
        } => {
            let bytes = B64.decode(request.trim()).map_err(|_| {
                CliError::local(
                    "the request is not base64",
                    "copy it whole from `cmr customer device new`",
                )
            })?;
            let req = cmr_core::identity::DeviceRequest::open(&bytes).map_err(|e| {
                CliError::local(
                    format!("the device request does not verify: {e}"),
                    "copy it whole from the new device",
                )
            })?;
            // Check where the enrolment goes before anything is certified.
            let folder = file
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            if !folder.is_dir() {
                return Err(CliError::local(
                    format!("the folder {} does not exist", folder.display()),
                    "give --out a file in an existing folder (a bare name writes in this one)",
                ));
            }
            let cert = c.add_device(&req, t).await?;
            let wrapped = l.vault.wrap_to_device(&mut rand::rng(), cert.body());
            let enrolment = Enrolment {
                certificate: B64.encode(cert.encode()),
                vault_key: B64.encode(wrapped.to_bytes()),
                sdk: CustomerState::save(c, &l.vault),
                companies: l.saved.role.companies.clone(),
                recovery_wrap: l.saved.role.recovery_wrap.clone(),
                recovery_seq: l.saved.role.recovery_seq,
                backup_version: l.saved.role.backup_version,
            };
            let json = serde_json::to_vec_pretty(&enrolment)
                .map_err(|e| CliError::local(e.to_string(), "report this"))?;
            home::write_private_file(&file, &json)?;
            out.line(format!(
                "device {} certified; compare this fingerprint with the new device's: {}",
                req.device().to_hex(),
                wellknown::fingerprint_of(&req.device().0)
            ));
            out.line(format!(
                "carry {} to the new device and run `cmr customer device join {}` there",
                file.display(),
                file.display()
            ));
            out.value(&json!({"device": req.device().to_hex(), "file": file}));
        }
        CustomerCmd::Device {
            cmd: DeviceCmd::List,
        } => {
            let devices = c.devices().await?;
            let mine = c.session.keys.device.id();
            let mut rows = Vec::new();
            for (cert, revoked) in &devices {
                let d = cert.device();
                let state = if *revoked {
                    "revoked"
                } else if d == mine {
                    "this device"
                } else {
                    "active"
                };
                out.line(format!(
                    "{}  {state}  (fingerprint {})",
                    d.to_hex(),
                    wellknown::fingerprint_of(&d.0)
                ));
                rows.push(json!({"device": d.to_hex(), "revoked": revoked, "this": d == mine}));
            }
            out.value(&json!({"devices": rows}));
        }
        CustomerCmd::Device {
            cmd: DeviceCmd::Revoke { device },
        } => {
            let known: Vec<[u8; 32]> = c
                .devices()
                .await?
                .iter()
                .map(|(cert, _)| cert.device().0)
                .collect();
            let d = cmr_core::identity::DeviceId(crate::out::resolve_id(&device, "device", known)?);
            let (rev, rotations) = c.revoke_device(d, t).await?;
            // The revoked device knew the vault key: replace it, wrapped to this device only.
            let cert = c
                .devices()
                .await?
                .into_iter()
                .find(|(x, _)| x.device() == c.session.keys.device.id())
                .map(|(x, _)| x)
                .ok_or_else(|| {
                    CliError::local("this device's certificate is missing", "report this")
                })?;
            let fresh = VaultKey::generate(&mut rand::rng());
            l.saved.role.vault_key =
                B64.encode(fresh.wrap_to_device(&mut rand::rng(), &cert).to_bytes());
            let me = c.id();
            let record = c.session.identity(me).await?.state.keys().current().clone();
            l.saved.role.recovery_wrap = B64.encode(
                fresh
                    .wrap_to_recovery(&mut rand::rng(), me, &record)
                    .to_bytes(),
            );
            l.saved.role.recovery_seq = record.seq;
            l.saved.role.backup_digest.clear();
            l.replaced = Some(std::mem::replace(&mut l.vault, fresh));
            out.line(format!("device revoked at log index {}; {} families rotated; the vault key was replaced (other devices join again)", rev.index, rotations.len()));
            out.value(
                &json!({"revoked": device, "index": rev.index, "rotations": rotations.len()}),
            );
        }
        _ => {
            return Err(CliError::local(
                "this command belongs to another group",
                "report this",
            ));
        }
    }
    Ok(())
}
