//! Who may do what: the seam between transports' servers and the server's credential checks.
//!
//! Routers (`ksync-ws`, `ksync-git`) extract [`Credentials`] from a request and ask an
//! [`Authenticator`] for a [`Grant`]; how tokens and keys are verified (JWT, API keys) is the
//! server's business (`ksync-server`), so routers never depend on a JWT library.

use std::fmt;

/// Raw credentials taken from a request. `Debug` never prints them.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Credentials {
    /// A bearer token (`Authorization: Bearer ..`, or a browser-friendly equivalent).
    pub bearer: Option<String>,
    /// An API key (`X-Api-Key: ..`, or a browser-friendly equivalent).
    pub api_key: Option<String>,
}

impl Credentials {
    /// Whether no credential was presented at all.
    pub fn is_empty(&self) -> bool {
        self.bearer.is_none() && self.api_key.is_none()
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("api_key", &self.api_key.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// The kind of thing being accessed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ResourceKind {
    /// A WebSocket room.
    Room,
    /// A Git-like repository.
    Repo,
}

/// Read or write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Receive / pull / clone.
    Read,
    /// Send / push / create branches / merge.
    Write,
}

/// What an authenticated caller may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Who (the token's `sub`, or the API key's configured name). Safe to log.
    pub subject: String,
    /// Rooms the caller may use; `None` = all.
    pub rooms: Option<Vec<String>>,
    /// Repositories the caller may use; `None` = all.
    pub repos: Option<Vec<String>>,
    /// May read.
    pub read: bool,
    /// May write.
    pub write: bool,
    /// When the credentials stop being valid (a JWT's `exp`, plus the server's leeway);
    /// `None` = they do not expire (API keys, no auth). Long-lived connections opened with
    /// them are closed at this time: a connection must not outlive its token.
    pub expires_at: Option<std::time::SystemTime>,
}

impl Grant {
    /// Full rights, for servers without auth configured.
    pub fn anonymous() -> Self {
        Self {
            subject: "anonymous".into(),
            rooms: None,
            repos: None,
            read: true,
            write: true,
            expires_at: None,
        }
    }

    /// Whether the credentials behind this grant have expired at `now`.
    pub fn expired_at(&self, now: std::time::SystemTime) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// Whether this grant allows `access` to the resource `name` of `kind`.
    pub fn allows(&self, kind: ResourceKind, name: &str, access: Access) -> bool {
        let scope = match kind {
            ResourceKind::Room => &self.rooms,
            ResourceKind::Repo => &self.repos,
        };
        let in_scope = scope
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == name || n == "*"));
        let right = match access {
            Access::Read => self.read,
            Access::Write => self.write,
        };
        in_scope && right
    }
}

/// Why credentials were refused. Messages are safe to show to the caller and to log: they
/// never contain the credential.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// Auth is required and nothing was presented.
    #[error("credentials required")]
    Missing,
    /// The credential is not valid (bad signature, unknown key, malformed, wrong audience...).
    #[error("invalid credentials: {0}")]
    Invalid(String),
    /// The token has expired.
    #[error("token expired")]
    Expired,
    /// The token is not valid yet.
    #[error("token not yet valid")]
    NotYetValid,
    /// Valid credentials without the right to do this.
    #[error("forbidden: {0}")]
    Forbidden(String),
    /// Too many failed attempts from this client; try later.
    #[error("too many failed authentication attempts")]
    RateLimited,
}

/// The realm named in `WWW-Authenticate` challenges.
pub const AUTH_REALM: &str = "ksync";

impl AuthError {
    /// The `WWW-Authenticate` value for the HTTP 401 answer to this refusal (RFC 9110 11.6.1
    /// requires one on every 401; the form is RFC 6750's), or `None` for refusals that are not
    /// 401 (`Forbidden`: 403, `RateLimited`: 429).
    ///
    /// Without credentials the challenge only names the scheme and realm; refused credentials
    /// add `error="invalid_token"` and this error's message, which never holds the credential.
    /// An API key is accepted in the same `Authorization: Bearer` header (or `X-Api-Key`).
    ///
    /// ```
    /// use ksync_core::AuthError;
    /// assert_eq!(AuthError::Missing.www_authenticate().as_deref(), Some(r#"Bearer realm="ksync""#));
    /// assert_eq!(
    ///     AuthError::Expired.www_authenticate().as_deref(),
    ///     Some(r#"Bearer realm="ksync", error="invalid_token", error_description="token expired""#)
    /// );
    /// assert_eq!(AuthError::RateLimited.www_authenticate(), None);
    /// ```
    pub fn www_authenticate(&self) -> Option<String> {
        match self {
            AuthError::Forbidden(_) | AuthError::RateLimited => None,
            AuthError::Missing => Some(format!("Bearer realm=\"{AUTH_REALM}\"")),
            AuthError::Invalid(_) | AuthError::Expired | AuthError::NotYetValid => {
                // A quoted-string may not hold `"` or `\` unescaped, and a header value only
                // visible ASCII and spaces: anything else is left out of the description.
                let description: String = self
                    .to_string()
                    .chars()
                    .filter(|c| (c.is_ascii_graphic() || *c == ' ') && !matches!(c, '"' | '\\'))
                    .collect();
                Some(format!(
                    "Bearer realm=\"{AUTH_REALM}\", error=\"invalid_token\", error_description=\"{description}\""
                ))
            }
        }
    }
}

/// Checks credentials. Implemented by `ksync-server` (JWT + API keys); [`AllowAll`] when auth
/// is not configured.
pub trait Authenticator: Send + Sync + 'static {
    /// Verifies `credentials` and returns what they allow.
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError>;

    /// Like [`authenticate`](Self::authenticate), from a client at `peer`. Routers that know
    /// the client's address call this one so that failed attempts can be rate-limited per
    /// client (`ksync-server` refuses a peer with [`AuthError::RateLimited`] after repeated
    /// failures). The default ignores `peer`.
    fn authenticate_peer(
        &self,
        credentials: &Credentials,
        peer: Option<std::net::IpAddr>,
    ) -> Result<Grant, AuthError> {
        let _ = peer;
        self.authenticate(credentials)
    }

    /// Whether credentials are required at all (false for [`AllowAll`]).
    fn required(&self) -> bool {
        true
    }
}

/// Lets everyone in with full rights: a server without auth configured.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl Authenticator for AllowAll {
    fn authenticate(&self, _: &Credentials) -> Result<Grant, AuthError> {
        Ok(Grant::anonymous())
    }

    fn required(&self) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_scope_rooms_and_rights() {
        let grant = Grant {
            subject: "u".into(),
            rooms: Some(vec!["a".into()]),
            repos: None,
            read: true,
            write: false,
            expires_at: None,
        };
        assert!(grant.allows(ResourceKind::Room, "a", Access::Read));
        assert!(!grant.allows(ResourceKind::Room, "a", Access::Write));
        assert!(!grant.allows(ResourceKind::Room, "b", Access::Read));
        assert!(grant.allows(ResourceKind::Repo, "anything", Access::Read));
        assert!(Grant::anonymous().allows(ResourceKind::Repo, "r", Access::Write));
    }

    #[test]
    fn credentials_debug_redacts() {
        let c = Credentials {
            bearer: Some("tok".into()),
            api_key: None,
        };
        assert!(!format!("{c:?}").contains("tok"));
    }
}
