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
use crate::config::Settings;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl TlsMode {
    pub fn parse(s: &str) -> Option<TlsMode> {
        Some(match s {
            "disable" => TlsMode::Disable,
            "prefer" | "allow" => TlsMode::Prefer,
            "require" => TlsMode::Require,
            "verify-ca" => TlsMode::VerifyCa,
            "verify-full" => TlsMode::VerifyFull,
            _ => return None,
        })
    }
}

/// Splits libpq's TLS options out of a URL: returns the URL tokio-postgres can
/// parse, the mode and the root certificate it asked for.
pub fn split_url(url: &str) -> (String, Option<TlsMode>, Option<PathBuf>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_string(), None, None);
    };
    let (mut mode, mut root) = (None, None);
    let kept: Vec<&str> = query
        .split('&')
        .filter(|kv| match kv.split_once('=') {
            Some(("sslmode", v)) => {
                mode = TlsMode::parse(v);
                false
            }
            Some(("sslrootcert", v)) => {
                root = Some(PathBuf::from(v));
                false
            }
            _ => true,
        })
        .collect();
    let url = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    (url, mode, root)
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_tls_options_are_taken_out_of_the_url() {
        let (u, m, r) =
            split_url("postgres://u:p@h:5432/db?sslmode=verify-full&sslrootcert=/ca.pem&application_name=x");
        assert_eq!(u, "postgres://u:p@h:5432/db?application_name=x");
        assert_eq!(m, Some(TlsMode::VerifyFull));
        assert_eq!(r, Some(PathBuf::from("/ca.pem")));
        let (u, m, _) = split_url("postgres://h/db?sslmode=require");
        assert_eq!((u.as_str(), m), ("postgres://h/db", Some(TlsMode::Require)));
        assert_eq!(split_url("postgres://h/db").0, "postgres://h/db");
    }
}
