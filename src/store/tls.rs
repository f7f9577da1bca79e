//! TLS to Postgres through native-tls (OpenSSL on Linux, the library librdkafka
//! already links: one TLS stack, the system CA store, FIPS-capable builds).
//!
//! Modes follow libpq: `disable`, `prefer` and `require` encrypt without
//! verifying (as libpq does); `verify-ca` checks the chain; `verify-full` also
//! checks the host name. libpq's `sslmode=verify-*` and `sslrootcert=` in the URL
//! are understood too (tokio-postgres alone rejects them).

use std::path::PathBuf;

use native_tls::{Certificate, TlsConnector};
use postgres_native_tls::MakeTlsConnector;
use tokio_postgres::config::SslMode;

use super::StoreError;
use crate::config::{Settings, TlsMode};

/// The connector for `settings` and the SSL mode tokio-postgres should use.
pub fn connector(
    settings: &Settings,
    url_mode: Option<TlsMode>,
    url_root: Option<PathBuf>,
) -> Result<(MakeTlsConnector, SslMode), StoreError> {
    let mode = match settings.postgres.tls_mode.as_deref() {
        Some(m) => TlsMode::parse(m).ok_or_else(|| {
            StoreError::config(format!(
                "config: `postgres.tls_mode` = {m:?}: use disable, prefer, require, verify-ca or verify-full"
            ))
        })?,
        None => url_mode.unwrap_or(TlsMode::Prefer),
    };
    let ca_file = settings.postgres.tls_ca_file.clone().or(url_root);
    let mut builder = TlsConnector::builder();
    match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => {
            builder.danger_accept_invalid_certs(true).danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyCa => {
            builder.danger_accept_invalid_hostnames(true);
        }
        TlsMode::VerifyFull => {}
    }
    if let Some(path) = &ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| StoreError::config(format!("config: `postgres.tls_ca_file` {}: {e}", path.display())))?;
        let cert = Certificate::from_pem(&pem).map_err(|e| {
            StoreError::config(format!(
                "config: `postgres.tls_ca_file` {} is not a PEM certificate: {e}",
                path.display()
            ))
        })?;
        builder.add_root_certificate(cert);
    }
    let tls = builder.build().map_err(|e| StoreError::config(format!("postgres TLS setup failed: {e}")))?;
    let ssl = match mode {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    };
    Ok((MakeTlsConnector::new(tls), ssl))
}
