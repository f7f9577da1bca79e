//! The Postgres URL as the configuration reads it: libpq's TLS options (which
//! tokio-postgres alone rejects) and a form fit for logs.

use std::path::PathBuf;

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

/// Returns the URL with any password replaced by `***`, for logs and errors.
pub fn redact_url(url: &str) -> String {
    // postgres://user:password@host/...  (also key=value "password=..." strings)
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        if let Some(at) = rest.rfind('@') {
            let userinfo = &rest[..at];
            if let Some(colon) = userinfo.find(':') {
                return format!("{}{}:***{}", &url[..scheme_end + 3], &userinfo[..colon], &rest[at..]);
            }
        }
        return url.to_string();
    }
    url.split_whitespace()
        .map(|kv| if kv.to_ascii_lowercase().starts_with("password=") { "password=***" } else { kv })
        .collect::<Vec<_>>()
        .join(" ")
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
