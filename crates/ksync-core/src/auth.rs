//! Credentials, as data. Verifying them is the server's job.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The `auth` option of every client: `{type: 'jwt', token}`, `{type: 'apikey', key}` or a plain
/// bearer `{type: 'token', token}`.
///
/// `Debug` never prints the secret.
///
/// ```
/// use ksync_core::Auth;
/// let auth: Auth = serde_json::from_str(r#"{"type":"apikey","key":"k-123"}"#).unwrap();
/// assert_eq!(auth, Auth::api_key("k-123"));
/// assert!(!format!("{auth:?}").contains("k-123"));
/// ```
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
#[non_exhaustive]
pub enum Auth {
    /// A JSON Web Token, sent as `Authorization: Bearer <token>`.
    Jwt {
        /// The encoded token.
        token: String,
    },
    /// An API key, sent as `X-Api-Key: <key>`.
    #[serde(rename = "apikey")]
    ApiKey {
        /// The key.
        key: String,
    },
    /// An opaque bearer token (e.g. the spec's `{type: 'token', token: 'github-token'}`), sent as
    /// `Authorization: Bearer <token>`; the server checks it like a JWT or an API key.
    Token {
        /// The token.
        token: String,
    },
}

impl Auth {
    /// JWT credentials.
    pub fn jwt(token: impl Into<String>) -> Self {
        Auth::Jwt {
            token: token.into(),
        }
    }

    /// API-key credentials.
    pub fn api_key(key: impl Into<String>) -> Self {
        Auth::ApiKey { key: key.into() }
    }

    /// Plain bearer-token credentials.
    pub fn token(token: impl Into<String>) -> Self {
        Auth::Token {
            token: token.into(),
        }
    }

    /// The HTTP header (name, value) that carries these credentials.
    pub fn header(&self) -> (&'static str, String) {
        match self {
            Auth::Jwt { token } | Auth::Token { token } => {
                ("authorization", format!("Bearer {token}"))
            }
            Auth::ApiKey { key } => ("x-api-key", key.clone()),
        }
    }

    /// Refuses credentials that can never be sent in [`Auth::header`]: a control character
    /// (e.g. a newline pasted with a token) or anything outside visible ASCII would make every
    /// request fail to build. Clients check this when built and in `set_auth`. The message
    /// never holds the secret.
    pub fn check_sendable(auth: Option<&Auth>) -> Result<(), crate::SyncError> {
        // RFC 9110 field values as `http::HeaderValue::from_str` takes them: visible ASCII,
        // space and tab.
        let sendable = |value: &str| {
            value
                .bytes()
                .all(|b| b == b'\t' || (0x20..0x7f).contains(&b))
        };
        match auth {
            Some(auth) if !sendable(&auth.header().1) => Err(crate::SyncError::Config(
                "credentials contain characters not allowed in an HTTP header".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The secret itself (for transports that must place it somewhere other than a header).
    pub fn secret(&self) -> &str {
        match self {
            Auth::Jwt { token } | Auth::Token { token } => token,
            Auth::ApiKey { key } => key,
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self {
            Auth::Jwt { .. } => "Jwt",
            Auth::ApiKey { .. } => "ApiKey",
            Auth::Token { .. } => "Token",
        };
        write!(f, "Auth::{kind}(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_shapes_parse() {
        let jwt: Auth =
            serde_json::from_str(r#"{"type":"jwt","token":"your-jwt-token"}"#).expect("jwt");
        assert_eq!(
            jwt.header(),
            ("authorization", "Bearer your-jwt-token".into())
        );
        let key: Auth =
            serde_json::from_str(r#"{"type":"apikey","key":"your-api-key"}"#).expect("key");
        assert_eq!(key.header(), ("x-api-key", "your-api-key".into()));
        let token: Auth =
            serde_json::from_str(r#"{"type":"token","token":"github-token"}"#).expect("token");
        assert_eq!(token, Auth::token("github-token"));
        assert!(serde_json::from_str::<Auth>(r#"{"type":"basic","user":"x"}"#).is_err());
    }

    #[test]
    fn debug_redacts() {
        assert_eq!(
            format!("{:?}", Auth::jwt("s3cret")),
            "Auth::Jwt(<redacted>)"
        );
    }
}
