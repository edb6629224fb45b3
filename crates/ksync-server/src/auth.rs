//! Credential checks: JWTs (HS256, RS256, EdDSA) and API keys, with per-client throttling of
//! failures. Implements [`ksync_core::Authenticator`] for the routers.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Validation};
use ksync_core::{AllowAll, AuthError, Authenticator, Credentials, Grant};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use crate::ServerError;
use crate::config::{AuthConfig, JwtKeyMaterial, Scope};
use crate::ratelimit::FailureLimiter;

tokio::task_local! {
    /// The client address of the request being handled, set by the server's HTTP layer, for
    /// routers that call [`Authenticator::authenticate`] without one.
    static CLIENT_IP: IpAddr;
}

/// Runs `future` (a request's handling) with `ip` as the client address that failed
/// authentications are counted against.
pub(crate) async fn with_client_ip<F: std::future::Future>(ip: IpAddr, future: F) -> F::Output {
    CLIENT_IP.scope(ip, future).await
}

/// Shortest accepted HS256 secret: RFC 7518 §3.2 asks for a key at least as long as the hash.
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Largest accepted JWT clock leeway (`AuthConfig::leeway`): a day. Leeway is for clock skew;
/// more would keep expired tokens alive (and past the epoch `jsonwebtoken`'s arithmetic
/// overflows).
pub const MAX_JWT_LEEWAY: std::time::Duration = std::time::Duration::from_secs(86_400);

/// The claims kSync reads from a JWT besides the registered ones that `jsonwebtoken` checks
/// (`exp` required; `nbf`, `aud`, `iss` when present or configured).
///
/// - `sub`: the subject, used in logs (default `"jwt"`).
/// - `rooms`: WebSocket rooms the token may use (array of names, `"*"` = any); absent = all.
/// - `repos`: repositories the token may use; absent = all.
/// - `scope`: `"read"`, `"write"` or `"read write"`; absent = both.
#[derive(Debug, Deserialize)]
struct KsyncClaims {
    /// Checked (and required) by `jsonwebtoken`; kept for the grant's expiry.
    #[serde(default, deserialize_with = "numeric_date")]
    exp: Option<u64>,
    sub: Option<String>,
    rooms: Option<Vec<String>>,
    repos: Option<Vec<String>>,
    scope: Option<String>,
}

/// RFC 7519's NumericDate: seconds since the epoch, which may have a fraction (an issuer
/// computing `Date.now() / 1000 + 3600`). Rounded to whole seconds, as `jsonwebtoken`'s own
/// `exp` check rounds it, so both agree on when the token ends: read as a `u64` only, such a
/// valid token was refused as malformed claims.
fn numeric_date<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumericDate {
        Whole(u64),
        Fraction(f64),
    }
    match Option::<NumericDate>::deserialize(deserializer)? {
        None => Ok(None),
        Some(NumericDate::Whole(secs)) => Ok(Some(secs)),
        // `u64::MAX as f64` is 2^64, itself out of range.
        Some(NumericDate::Fraction(secs))
            if secs.is_finite() && secs >= 0.0 && secs < u64::MAX as f64 =>
        {
            Ok(Some(secs.round() as u64))
        }
        Some(NumericDate::Fraction(_)) => Err(serde::de::Error::custom(
            "not a NumericDate (seconds since the epoch, at least 0)",
        )),
    }
}

struct VerifyingKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
    validation: Validation,
}

struct StoredApiKey {
    name: String,
    digest: Vec<u8>,
    scope: Scope,
    rooms: Option<Vec<String>>,
    repos: Option<Vec<String>>,
}

/// Counters of authentication outcomes, for `/metrics`.
#[derive(Debug, Default)]
pub struct AuthCounters {
    /// Accepted credentials.
    pub accepted: AtomicU64,
    /// Refused credentials (missing, invalid, expired...).
    pub refused: AtomicU64,
    /// Attempts refused because the client had failed too often.
    pub rate_limited: AtomicU64,
}

/// Verifies JWTs and API keys as configured; refuses everything else.
///
/// The verification key and algorithm come from the configuration only: a token's header may
/// pick among configured keys (by `alg`, and by `kid` when keys have ids) but can never bring
/// its own algorithm (`alg: none` and HS/RS confusion are refused).
pub struct ServerAuthenticator {
    jwt_keys: Vec<VerifyingKey>,
    api_keys: Vec<StoredApiKey>,
    limiter: FailureLimiter,
    counters: Arc<AuthCounters>,
    /// Tolerated clock skew: a token stays valid until `exp + leeway`.
    leeway: std::time::Duration,
}

impl std::fmt::Debug for ServerAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerAuthenticator")
            .field("jwt_keys", &self.jwt_keys.len())
            .field(
                "api_keys",
                &self.api_keys.iter().map(|k| &k.name).collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// Builds the authenticator for `config`: [`AllowAll`] when no credential is configured,
/// otherwise a [`ServerAuthenticator`].
pub fn authenticator_for(config: &AuthConfig) -> Result<Arc<dyn Authenticator>, ServerError> {
    if config.is_enabled() {
        Ok(Arc::new(ServerAuthenticator::new(config)?))
    } else {
        Ok(Arc::new(AllowAll))
    }
}

/// A fixed-length digest of an API key, so that comparing two keys takes the same time
/// whatever their lengths and contents (HMAC-SHA256 under a fixed, public key: it only needs
/// to be a hash).
fn api_key_digest(key: &[u8]) -> Vec<u8> {
    jsonwebtoken::crypto::sign(
        key,
        &EncodingKey::from_secret(b"ksync api key comparison"),
        Algorithm::HS256,
    )
    .map(String::into_bytes)
    .unwrap_or_default()
}

/// The algorithm and verification key of `material`, or what is wrong with it: the kind of
/// key (`"RS256 public key"`, ...) and the reason, never the material itself.
pub(crate) fn decoding_key(
    material: &JwtKeyMaterial,
) -> Result<(Algorithm, DecodingKey), (&'static str, String)> {
    match material {
        JwtKeyMaterial::Hs256(secret) => {
            if secret.expose().len() < MIN_HS256_SECRET_BYTES {
                return Err((
                    "HS256 secret",
                    format!("must be at least {MIN_HS256_SECRET_BYTES} bytes"),
                ));
            }
            Ok((Algorithm::HS256, DecodingKey::from_secret(secret.expose())))
        }
        JwtKeyMaterial::Rs256PublicPem(pem) => {
            const KIND: &str = "RS256 public key";
            refuse_private_pem(pem).map_err(|reason| (KIND, reason))?;
            let key = DecodingKey::from_rsa_pem(pem).map_err(|_| {
                (
                    KIND,
                    "not an RSA public key in PEM (-----BEGIN PUBLIC KEY----- or -----BEGIN RSA PUBLIC KEY-----)"
                        .to_owned(),
                )
            })?;
            Ok((Algorithm::RS256, key))
        }
        JwtKeyMaterial::EdDsaPublicPem(pem) => {
            const KIND: &str = "EdDSA public key";
            refuse_private_pem(pem).map_err(|reason| (KIND, reason))?;
            let key = DecodingKey::from_ed_pem(pem).map_err(|_| {
                (
                    KIND,
                    "not an Ed25519 public key in PEM (-----BEGIN PUBLIC KEY-----)".to_owned(),
                )
            })?;
            Ok((Algorithm::EdDSA, key))
        }
    }
}

/// Refuses a PEM whose first block is a private key where a public key belongs.
/// `jsonwebtoken` takes an RSA private key as an RS256 "public" key without complaint, and
/// then no token ever verifies; the private key has no business on the server either.
fn refuse_private_pem(pem: &[u8]) -> Result<(), String> {
    let text = String::from_utf8_lossy(pem);
    let label = text
        .split_once("-----BEGIN ")
        .and_then(|(_, rest)| rest.split_once("-----"))
        .map(|(label, _)| label);
    match label {
        Some(label) if label.ends_with("PRIVATE KEY") => Err(format!(
            "this is a private key ({label}); give its public key (`openssl pkey -in KEY -pubout`)"
        )),
        _ => Ok(()),
    }
}

impl ServerAuthenticator {
    /// Loads every configured key. Fails on an unusable key (a short HS256 secret, a PEM that
    /// does not parse), duplicate API key names, or a configuration without any credential.
    pub fn new(config: &AuthConfig) -> Result<Self, ServerError> {
        if !config.is_enabled() {
            return Err(ServerError::Config(
                "no JWT key and no API key configured".into(),
            ));
        }
        if config.leeway > MAX_JWT_LEEWAY {
            return Err(ServerError::Config(format!(
                "JWT leeway {:?} is more than the largest accepted, {MAX_JWT_LEEWAY:?}",
                config.leeway
            )));
        }
        let mut jwt_keys = Vec::with_capacity(config.jwt_keys.len());
        for key in &config.jwt_keys {
            let label = |kind: &str| key.kid.clone().unwrap_or_else(|| kind.to_owned());
            let invalid = |kind: &str, reason: String| ServerError::InvalidKey {
                name: label(kind),
                reason,
            };
            let (algorithm, decoding) =
                decoding_key(&key.material).map_err(|(kind, reason)| invalid(kind, reason))?;
            let mut validation = Validation::new(algorithm);
            validation.leeway = config.leeway.as_secs();
            validation.validate_exp = true;
            // jsonwebtoken skips `nbf` unless asked.
            validation.validate_nbf = true;
            let mut required = vec!["exp"];
            if config.audience.is_empty() {
                // Nothing to compare with; a token's `aud` is for the issuer's other audiences.
                validation.validate_aud = false;
            } else {
                validation.set_audience(&config.audience);
                required.push("aud");
            }
            if !config.issuer.is_empty() {
                validation.set_issuer(&config.issuer);
                required.push("iss");
            }
            validation.set_required_spec_claims(&required);
            jwt_keys.push(VerifyingKey {
                kid: key.kid.clone(),
                algorithm,
                key: decoding,
                validation,
            });
        }
        let mut api_keys: Vec<StoredApiKey> = Vec::with_capacity(config.api_keys.len());
        for key in &config.api_keys {
            if api_keys.iter().any(|k| k.name == key.name) {
                return Err(ServerError::Config(format!(
                    "API key name {:?} is used twice",
                    key.name
                )));
            }
            if key.key.expose().is_empty() {
                return Err(ServerError::InvalidKey {
                    name: key.name.clone(),
                    reason: "empty API key".into(),
                });
            }
            let digest = api_key_digest(key.key.expose());
            // One secret under two names would get whichever came last: its scope and rooms
            // (a key meant read-only could write). The value itself is never shown.
            if let Some(first) = api_keys.iter().find(|k| k.digest == digest) {
                return Err(ServerError::Config(format!(
                    "API keys {:?} and {:?} have the same value; give each its own",
                    first.name, key.name
                )));
            }
            api_keys.push(StoredApiKey {
                name: key.name.clone(),
                digest,
                scope: key.scope,
                rooms: key.rooms.clone(),
                repos: key.repos.clone(),
            });
        }
        tracing::info!(
            jwt_keys = jwt_keys.len(),
            api_keys = ?api_keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
            "authentication required"
        );
        Ok(Self {
            jwt_keys,
            api_keys,
            limiter: FailureLimiter::new(config.rate_limit.clone()),
            counters: Arc::new(AuthCounters::default()),
            leeway: config.leeway,
        })
    }

    /// Outcome counters (shared; read them for metrics).
    pub fn counters(&self) -> Arc<AuthCounters> {
        Arc::clone(&self.counters)
    }

    /// Whether `peer` is currently refused for failing too often. Lets the HTTP layer turn such
    /// a client away before any work is done.
    pub fn is_rate_limited(&self, peer: IpAddr) -> bool {
        self.limiter.is_blocked(peer)
    }

    fn check(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        if let Some(bearer) = credentials.bearer.as_deref() {
            // An API key sent as a bearer token (clients that only know `Authorization`):
            // whatever is not a JWT (a header that decodes) is one, dots or not (keys like
            // `team.ci.k3y` were read as malformed JWTs).
            if !self.api_keys.is_empty() && jsonwebtoken::decode_header(bearer).is_err() {
                return self.check_api_key(bearer);
            }
            return self.check_jwt(bearer);
        }
        if let Some(key) = credentials.api_key.as_deref() {
            return self.check_api_key(key);
        }
        Err(AuthError::Missing)
    }

    fn check_api_key(&self, presented: &str) -> Result<Grant, AuthError> {
        if self.api_keys.is_empty() {
            return Err(AuthError::Invalid("API keys are not accepted".into()));
        }
        let digest = api_key_digest(presented.as_bytes());
        // Compare with every key, without stopping at the first match.
        let mut found = None;
        for key in &self.api_keys {
            if bool::from(key.digest.ct_eq(&digest)) {
                found = Some(key);
            }
        }
        let key = found.ok_or_else(|| AuthError::Invalid("unknown API key".into()))?;
        Ok(Grant {
            subject: key.name.clone(),
            rooms: key.rooms.clone(),
            repos: key.repos.clone(),
            read: key.scope.read,
            write: key.scope.write,
            expires_at: None,
        })
    }

    fn check_jwt(&self, token: &str) -> Result<Grant, AuthError> {
        if self.jwt_keys.is_empty() {
            return Err(AuthError::Invalid("JWTs are not accepted".into()));
        }
        // `alg: none` and unknown algorithms fail here: jsonwebtoken's `Algorithm` has no `none`.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token or unsupported algorithm".into()))?;
        let same_alg: Vec<&VerifyingKey> = self
            .jwt_keys
            .iter()
            .filter(|k| k.algorithm == header.alg)
            .collect();
        if same_alg.is_empty() {
            return Err(AuthError::Invalid(format!(
                "algorithm {:?} not accepted",
                header.alg
            )));
        }
        let kids_configured = same_alg.iter().any(|k| k.kid.is_some());
        let candidates: Vec<&VerifyingKey> = match (&header.kid, kids_configured) {
            (Some(kid), true) => same_alg
                .into_iter()
                .filter(|k| k.kid.as_deref() == Some(kid.as_str()))
                .collect(),
            (None, true) => same_alg.into_iter().filter(|k| k.kid.is_none()).collect(),
            (_, false) => same_alg,
        };
        if candidates.is_empty() {
            return Err(AuthError::Invalid(match header.kid {
                Some(_) => "unknown key id".into(),
                None => "key id required".into(),
            }));
        }
        let mut last = AuthError::Invalid("bad signature".into());
        for key in candidates {
            match jsonwebtoken::decode::<KsyncClaims>(token, &key.key, &key.validation) {
                Ok(data) => {
                    let grant = grant_from_claims(data.claims, self.leeway);
                    // RFC 7519 4.1.4: not accepted *on* or after `exp` (jsonwebtoken still
                    // accepts the second of `exp` itself); the same instant at which the relay
                    // closes a connection opened with it.
                    if grant.expired_at(std::time::SystemTime::now()) {
                        return Err(AuthError::Expired);
                    }
                    return Ok(grant);
                }
                Err(e) => {
                    last = map_jwt_error(e.kind());
                    // A valid signature with bad claims is the answer; another key won't help.
                    if !matches!(e.kind(), ErrorKind::InvalidSignature) {
                        break;
                    }
                }
            }
        }
        Err(last)
    }
}

fn grant_from_claims(claims: KsyncClaims, leeway: std::time::Duration) -> Grant {
    let scope = claims
        .scope
        .as_deref()
        .map_or(Scope::READ_WRITE, Scope::parse);
    // Valid until `exp` plus the leeway the check allowed: the instant an upgrade with this
    // token would be refused. (Past what `SystemTime` holds: no expiry to enforce.)
    let expires_at = claims.exp.and_then(|exp| {
        std::time::UNIX_EPOCH.checked_add(std::time::Duration::from_secs(exp).checked_add(leeway)?)
    });
    Grant {
        subject: claims.sub.unwrap_or_else(|| "jwt".into()),
        rooms: claims.rooms,
        repos: claims.repos,
        read: scope.read,
        write: scope.write,
        expires_at,
    }
}

fn map_jwt_error(kind: &ErrorKind) -> AuthError {
    match kind {
        ErrorKind::ExpiredSignature => AuthError::Expired,
        ErrorKind::ImmatureSignature => AuthError::NotYetValid,
        ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
        ErrorKind::MissingRequiredClaim(claim) => {
            AuthError::Invalid(format!("missing claim {claim}"))
        }
        ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
        ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
        ErrorKind::InvalidClaimFormat(claim) => {
            AuthError::Invalid(format!("malformed claim {claim}"))
        }
        ErrorKind::Json(_) => AuthError::Invalid("malformed claims".into()),
        _ => AuthError::Invalid("malformed token".into()),
    }
}

impl Authenticator for ServerAuthenticator {
    fn authenticate(&self, credentials: &Credentials) -> Result<Grant, AuthError> {
        self.authenticate_peer(credentials, None)
    }

    fn authenticate_peer(
        &self,
        credentials: &Credentials,
        peer: Option<IpAddr>,
    ) -> Result<Grant, AuthError> {
        let peer = peer.or_else(|| CLIENT_IP.try_with(|ip| *ip).ok());
        if let Some(ip) = peer
            && self.limiter.is_blocked(ip)
        {
            self.counters.rate_limited.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(peer = %ip, "authentication refused: too many failures");
            return Err(AuthError::RateLimited);
        }
        match self.check(credentials) {
            Ok(grant) => {
                self.counters.accepted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(subject = %grant.subject, peer = ?peer, "authenticated");
                Ok(grant)
            }
            Err(error) => {
                self.counters.refused.fetch_add(1, Ordering::Relaxed);
                // Only a presented credential can be a guess; a client that simply has none
                // (a page before its user signed in) is not locked out for retrying.
                if let Some(ip) = peer
                    && error != AuthError::Missing
                {
                    self.limiter.record_failure(ip);
                }
                tracing::info!(peer = ?peer, %error, "authentication refused");
                Err(error)
            }
        }
    }

    fn required(&self) -> bool {
        true
    }
}
