//! The auth matrix, against the real `ServerAuthenticator` with keys from tests/fixtures.
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::net::IpAddr;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use ksync_core::{Access, AuthError, Authenticator, Credentials, ResourceKind};
use ksync_server::{
    ApiKey, AuthConfig, JwtKey, RateLimit, Scope, ServerAuthenticator, ServerError,
    authenticator_for,
};
use serde_json::{Value, json};

const SECRET: &str = "0123456789abcdef0123456789abcdef-test-secret";
const RSA_PRIVATE: &[u8] = include_bytes!("../fixtures/rsa-private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../fixtures/rsa-public.pem");
const RSA_OTHER_PRIVATE: &[u8] = include_bytes!("../fixtures/rsa-other-private.pem");
const ED_PRIVATE: &[u8] = include_bytes!("../fixtures/ed25519-private.pem");
const ED_PUBLIC: &[u8] = include_bytes!("../fixtures/ed25519-public.pem");
const ED_OTHER_PRIVATE: &[u8] = include_bytes!("../fixtures/ed25519-other-private.pem");

fn now() -> u64 {
    get_current_timestamp()
}

fn claims(extra: Value) -> Value {
    let mut base = json!({"sub": "alice", "exp": now() + 300});
    if let (Some(base), Some(extra)) = (base.as_object_mut(), extra.as_object()) {
        for (k, v) in extra {
            base.insert(k.clone(), v.clone());
        }
    }
    base
}

fn hs256(claims: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn rs256(claims: &Value, private_pem: &[u8], kid: Option<&str>) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    encode(
        &header,
        claims,
        &EncodingKey::from_rsa_pem(private_pem).unwrap(),
    )
    .unwrap()
}

fn eddsa(claims: &Value, private_pem: &[u8]) -> String {
    encode(
        &Header::new(Algorithm::EdDSA),
        claims,
        &EncodingKey::from_ed_pem(private_pem).unwrap(),
    )
    .unwrap()
}

fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn bearer(token: &str) -> Credentials {
    Credentials {
        bearer: Some(token.to_owned()),
        ..Credentials::default()
    }
}

fn api_key(key: &str) -> Credentials {
    Credentials {
        api_key: Some(key.to_owned()),
        ..Credentials::default()
    }
}

fn config() -> AuthConfig {
    {
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![
            JwtKey::hs256(SECRET),
            JwtKey::rs256_pem(RSA_PUBLIC),
            JwtKey::eddsa_pem(ED_PUBLIC),
        ];
        auth_config.api_keys = vec![
            ApiKey::new("ci-bot", "k-full-0001"),
            ApiKey::new("dashboard", "k-read-0002")
                .with_scope(Scope::READ)
                .with_rooms(vec!["lobby".into()]),
        ];
        auth_config
    }
}

fn auth() -> ServerAuthenticator {
    ServerAuthenticator::new(&config()).unwrap()
}

fn assert_invalid(result: Result<ksync_core::Grant, AuthError>, what: &str) {
    match result {
        Err(AuthError::Invalid(_)) => {}
        other => panic!("{what}: expected Invalid, got {other:?}"),
    }
}

#[test]
fn valid_tokens_of_each_algorithm_are_accepted() {
    let a = auth();
    for token in [
        hs256(&claims(json!({}))),
        rs256(&claims(json!({})), RSA_PRIVATE, None),
        eddsa(&claims(json!({})), ED_PRIVATE),
    ] {
        let grant = a.authenticate(&bearer(&token)).unwrap();
        assert_eq!(grant.subject, "alice");
        assert!(grant.allows(ResourceKind::Room, "any", Access::Write));
    }
}

#[test]
fn missing_credentials_are_refused() {
    assert_eq!(
        auth().authenticate(&Credentials::default()),
        Err(AuthError::Missing)
    );
}

#[test]
fn wrong_keys_are_refused() {
    let a = auth();
    let wrong_hs = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(b"another-secret-that-is-long-enough-000"),
    )
    .unwrap();
    assert_invalid(a.authenticate(&bearer(&wrong_hs)), "wrong HS secret");
    assert_invalid(
        a.authenticate(&bearer(&rs256(&claims(json!({})), RSA_OTHER_PRIVATE, None))),
        "wrong RSA key",
    );
    assert_invalid(
        a.authenticate(&bearer(&eddsa(&claims(json!({})), ED_OTHER_PRIVATE))),
        "wrong Ed25519 key",
    );
    assert_invalid(a.authenticate(&api_key("k-full-0009")), "wrong API key");
    assert_invalid(a.authenticate(&api_key("")), "empty API key");
    assert_invalid(a.authenticate(&bearer("not a token")), "garbage bearer");
}

#[test]
fn expired_and_not_yet_valid_tokens_are_refused() {
    let a = auth();
    // Beyond the 5 s leeway in each direction.
    let expired = hs256(&claims(json!({"exp": now() - 30})));
    assert_eq!(a.authenticate(&bearer(&expired)), Err(AuthError::Expired));
    let early = hs256(&claims(json!({"nbf": now() + 60})));
    assert_eq!(a.authenticate(&bearer(&early)), Err(AuthError::NotYetValid));
    let no_exp = hs256(&json!({"sub": "alice"}));
    assert_invalid(a.authenticate(&bearer(&no_exp)), "token without exp");
    // Inside the leeway: accepted (clock skew).
    let skewed = hs256(&claims(json!({"nbf": now() + 2})));
    assert!(a.authenticate(&bearer(&skewed)).is_ok());
}

/// RFC 7519's NumericDate may have a fraction (`exp: Date.now() / 1000 + 3600` in a
/// JavaScript issuer): such a token is checked like any other (its `exp` rounded, as
/// jsonwebtoken's own check does), not refused as malformed claims.
#[test]
fn an_exp_with_a_fraction_of_a_second_is_a_numeric_date() {
    let a = auth();
    let exp = now() as f64 + 300.5;
    let grant = a
        .authenticate(&bearer(&hs256(&claims(json!({"exp": exp})))))
        .expect("a valid token with a fractional exp");
    let leeway = AuthConfig::default().leeway;
    assert_eq!(
        grant.expires_at,
        Some(std::time::UNIX_EPOCH + Duration::from_secs(exp.round() as u64) + leeway),
        "valid until its exp plus the leeway"
    );
    let expired = hs256(&claims(json!({"exp": now() as f64 - 30.5})));
    assert_eq!(a.authenticate(&bearer(&expired)), Err(AuthError::Expired));
    for bad in [json!(-1.5), json!("soon"), json!(1e300)] {
        assert!(
            a.authenticate(&bearer(&hs256(&claims(json!({"exp": bad.clone()})))))
                .is_err(),
            "exp {bad}"
        );
    }
}

#[test]
fn audience_and_issuer_are_checked_when_configured() {
    let a = ServerAuthenticator::new(&{
        let mut auth_config = config();
        auth_config.audience = vec!["ksync".into()];
        auth_config.issuer = vec!["https://issuer.example".into()];
        auth_config
    })
    .unwrap();
    let good = claims(json!({"aud": "ksync", "iss": "https://issuer.example"}));
    assert!(a.authenticate(&bearer(&hs256(&good))).is_ok());
    for (bad, what) in [
        (
            claims(json!({"aud": "other", "iss": "https://issuer.example"})),
            "wrong aud",
        ),
        (
            claims(json!({"aud": "ksync", "iss": "https://evil.example"})),
            "wrong iss",
        ),
        (
            claims(json!({"iss": "https://issuer.example"})),
            "missing aud",
        ),
        (claims(json!({"aud": "ksync"})), "missing iss"),
    ] {
        assert_invalid(a.authenticate(&bearer(&hs256(&bad))), what);
    }
}

#[test]
fn alg_none_is_refused() {
    let a = auth();
    let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let payload = b64(claims(json!({})).to_string().as_bytes());
    for token in [
        format!("{header}.{payload}."),
        format!("{header}.{payload}"),
    ] {
        assert_invalid(a.authenticate(&bearer(&token)), "alg none");
    }
}

#[test]
fn hs_rs_confusion_is_refused() {
    // An attacker signs HS256 with the server's RSA *public* key as the HMAC secret.
    let forged = encode(
        &Header::new(Algorithm::HS256),
        &claims(json!({})),
        &EncodingKey::from_secret(RSA_PUBLIC),
    )
    .unwrap();
    assert_invalid(auth().authenticate(&bearer(&forged)), "HS/RS confusion");
    // And a server with only an RSA key accepts no HS256 at all.
    let rs_only = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::rs256_pem(RSA_PUBLIC)];
        auth_config
    })
    .unwrap();
    assert_invalid(
        rs_only.authenticate(&bearer(&forged)),
        "HS256 on RS-only server",
    );
    assert!(
        rs_only
            .authenticate(&bearer(&rs256(&claims(json!({})), RSA_PRIVATE, None)))
            .is_ok()
    );
}

#[test]
fn tampered_payload_is_refused() {
    let token = hs256(&claims(json!({"scope": "read"})));
    let parts: Vec<&str> = token.split('.').collect();
    let upgraded = b64(claims(json!({"scope": "read write"}))
        .to_string()
        .as_bytes());
    let tampered = format!("{}.{}.{}", parts[0], upgraded, parts[2]);
    assert_invalid(auth().authenticate(&bearer(&tampered)), "tampered payload");
}

#[test]
fn kids_select_keys_and_unknown_kids_are_refused() {
    let a = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::rs256_pem(RSA_PUBLIC).with_kid("2026-key")];
        auth_config
    })
    .unwrap();
    let c = claims(json!({}));
    assert!(
        a.authenticate(&bearer(&rs256(&c, RSA_PRIVATE, Some("2026-key"))))
            .is_ok()
    );
    assert_invalid(
        a.authenticate(&bearer(&rs256(&c, RSA_PRIVATE, Some("old-key")))),
        "unknown kid",
    );
    assert_invalid(
        a.authenticate(&bearer(&rs256(&c, RSA_PRIVATE, None))),
        "missing kid when kids are configured",
    );
}

#[test]
fn claims_limit_rooms_repos_and_rights() {
    let a = auth();
    let token = hs256(&claims(
        json!({"rooms": ["lobby"], "repos": ["notes"], "scope": "read"}),
    ));
    let grant = a.authenticate(&bearer(&token)).unwrap();
    assert!(grant.allows(ResourceKind::Room, "lobby", Access::Read));
    assert!(
        !grant.allows(ResourceKind::Room, "lobby", Access::Write),
        "read-only writing"
    );
    assert!(
        !grant.allows(ResourceKind::Room, "secret", Access::Read),
        "wrong room"
    );
    assert!(grant.allows(ResourceKind::Repo, "notes", Access::Read));
    assert!(
        !grant.allows(ResourceKind::Repo, "other", Access::Read),
        "wrong repo"
    );

    let writer = hs256(&claims(json!({"scope": "write"})));
    let grant = a.authenticate(&bearer(&writer)).unwrap();
    assert!(grant.allows(ResourceKind::Room, "x", Access::Write));
    assert!(!grant.allows(ResourceKind::Room, "x", Access::Read));

    let malformed = hs256(&claims(json!({"rooms": "lobby"})));
    assert_invalid(
        a.authenticate(&bearer(&malformed)),
        "rooms must be an array",
    );
}

#[test]
fn api_keys_carry_their_configured_rights() {
    let a = auth();
    let full = a.authenticate(&api_key("k-full-0001")).unwrap();
    assert_eq!(full.subject, "ci-bot");
    assert!(full.allows(ResourceKind::Repo, "r", Access::Write));
    let read = a.authenticate(&api_key("k-read-0002")).unwrap();
    assert_eq!(read.subject, "dashboard");
    assert!(read.allows(ResourceKind::Room, "lobby", Access::Read));
    assert!(!read.allows(ResourceKind::Room, "lobby", Access::Write));
    assert!(!read.allows(ResourceKind::Room, "other", Access::Read));
    // Clients that only know `Authorization: Bearer` may send an API key there.
    assert_eq!(
        a.authenticate(&bearer("k-full-0001")).unwrap().subject,
        "ci-bot"
    );
}

#[test]
fn repeated_failures_are_rate_limited_per_client() {
    let a = ServerAuthenticator::new(&{
        let mut auth_config = config();
        auth_config.rate_limit = {
            let mut rate_limit = RateLimit::default();
            rate_limit.max_failures = 3;
            rate_limit.window = Duration::from_secs(600);
            rate_limit.max_clients = 100;
            rate_limit
        };
        auth_config
    })
    .unwrap();
    let attacker: IpAddr = "192.0.2.7".parse().unwrap();
    let other: IpAddr = "192.0.2.8".parse().unwrap();
    // Connecting without credentials is refused but is not a guess: never throttled.
    for _ in 0..10 {
        assert_eq!(
            a.authenticate_peer(&Credentials::default(), Some(attacker)),
            Err(AuthError::Missing)
        );
    }
    assert!(!a.is_rate_limited(attacker));
    for _ in 0..3 {
        assert_invalid(
            a.authenticate_peer(&api_key("guess"), Some(attacker)),
            "guess",
        );
    }
    // Now even the right key is refused from that client, but not from others.
    assert_eq!(
        a.authenticate_peer(&api_key("k-full-0001"), Some(attacker)),
        Err(AuthError::RateLimited)
    );
    assert!(a.is_rate_limited(attacker));
    assert!(
        a.authenticate_peer(&api_key("k-full-0001"), Some(other))
            .is_ok()
    );
    let counters = a.counters();
    assert_eq!(
        counters
            .rate_limited
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
}

#[test]
fn configuration_errors_are_typed_and_do_not_leak_secrets() {
    let short = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::hs256("short-secret-xyz")];
        auth_config
    })
    .unwrap_err();
    assert!(matches!(short, ServerError::InvalidKey { .. }));
    assert!(!short.to_string().contains("short-secret-xyz"));

    let bad_pem = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.jwt_keys = vec![JwtKey::rs256_pem(b"not a pem".to_vec())];
        auth_config
    })
    .unwrap_err();
    assert!(matches!(bad_pem, ServerError::InvalidKey { .. }));

    let dup = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.api_keys = vec![ApiKey::new("a", "k1"), ApiKey::new("a", "k2")];
        auth_config
    })
    .unwrap_err();
    assert!(matches!(dup, ServerError::Config(_)));
    // One value under two names: which name (and scope) it got depended on their order.
    let same = ServerAuthenticator::new(&{
        let mut auth_config = AuthConfig::default();
        auth_config.api_keys = vec![
            ApiKey::parse_spec("dashboard:read=s3cr3t-value").unwrap(),
            ApiKey::parse_spec("admin=s3cr3t-value").unwrap(),
        ];
        auth_config
    })
    .unwrap_err();
    let message = same.to_string();
    assert!(matches!(same, ServerError::Config(_)), "{message}");
    assert!(
        message.contains("dashboard") && message.contains("admin"),
        "{message}"
    );
    assert!(!message.contains("s3cr3t"), "{message}");

    let spec = ApiKey::parse_spec("reader:read=s3cr3t-value").unwrap();
    assert_eq!(spec.name, "reader");
    assert_eq!(spec.scope, Scope::READ);
    assert!(!format!("{spec:?}").contains("s3cr3t-value"));
    let err = ApiKey::parse_spec("no-equals-s3cr3t").unwrap_err();
    assert!(!err.to_string().contains("s3cr3t"));
    let both = ApiKey::parse_spec("ci:read+write=s3cr3t-value").unwrap();
    assert_eq!(both.scope, Scope::READ_WRITE);
    assert_eq!(
        ApiKey::parse_spec("ci=s3cr3t-value").unwrap().scope,
        Scope::READ_WRITE
    );
    // A typo in a scope refuses to start rather than grant less than meant.
    for spec in [
        "ci:rw=s3cr3t-value",
        "ci:read+wirte=s3cr3t-value",
        "ci:=s3cr3t-value",
    ] {
        let err = ApiKey::parse_spec(spec).unwrap_err();
        assert!(matches!(err, ServerError::Config(_)), "{spec}: {err}");
        assert!(err.to_string().contains("scope"), "{spec}: {err}");
        assert!(!err.to_string().contains("s3cr3t"), "{spec}: {err}");
    }
    assert!(!format!("{:?}", auth()).contains("k-full-0001"));
}

#[test]
fn no_configured_credentials_means_allow_all() {
    let open = authenticator_for(&AuthConfig::default()).unwrap();
    assert!(!open.required());
    assert!(open.authenticate(&Credentials::default()).is_ok());
    let closed = authenticator_for(&config()).unwrap();
    assert!(closed.required());
    assert_eq!(
        closed.authenticate(&Credentials::default()),
        Err(AuthError::Missing)
    );
}

#[test]
fn a_leeway_beyond_a_day_is_a_configuration_error() {
    // jsonwebtoken computes `now - leeway` and `now + leeway` in u64: a leeway past the epoch
    // panicked on every JWT (overflow) in debug builds and accepted any `exp` in release.
    let absurd = {
        let mut auth_config = config();
        auth_config.leeway = Duration::from_secs(10_000_000_000);
        auth_config
    };
    match ServerAuthenticator::new(&absurd) {
        Err(ServerError::Config(message)) => assert!(message.contains("leeway"), "{message}"),
        Err(other) => panic!("expected a configuration error, got {other}"),
        Ok(a) => {
            let token = hs256(&claims(json!({})));
            let outcome = std::panic::catch_unwind(|| a.authenticate(&bearer(&token)));
            panic!("accepted; a request then gave {outcome:?}");
        }
    }
    // A day is still accepted, and an expired token still refused with it.
    let day = ServerAuthenticator::new(&{
        let mut auth_config = config();
        auth_config.leeway = ksync_server::MAX_JWT_LEEWAY;
        auth_config
    })
    .unwrap();
    assert!(
        day.authenticate(&bearer(&hs256(&claims(json!({})))))
            .is_ok()
    );
    assert_eq!(
        day.authenticate(&bearer(&hs256(&json!({"exp": now() - 2 * 86_400})))),
        Err(AuthError::Expired)
    );
}

/// A private key where the public key belongs: `jsonwebtoken` takes an RSA one as an RS256
/// "public" key, and then no token ever verifies. Refused at start, saying so, and the file
/// loaders name the file.
#[test]
fn a_private_key_given_as_a_public_key_is_refused_at_start() {
    for key in [
        JwtKey::rs256_pem(RSA_PRIVATE),
        JwtKey::eddsa_pem(ED_PRIVATE),
    ] {
        let result = ServerAuthenticator::new(&{
            let mut auth_config = AuthConfig::default();
            auth_config.jwt_keys = vec![key.clone()];
            auth_config
        });
        match result {
            Err(error @ ServerError::InvalidKey { .. }) => {
                let message = error.to_string();
                assert!(message.contains("private key"), "{message}");
                assert!(message.contains("public key"), "{message}");
                assert!(!message.contains("MII"), "no key material: {message}");
            }
            Err(other) => panic!("{key:?}: expected InvalidKey, got {other}"),
            Ok(auth) => {
                let rs = rs256(&claims(json!({})), RSA_PRIVATE, None);
                panic!(
                    "{key:?} accepted; a token signed by it then gives {:?}",
                    auth.authenticate(&bearer(&rs))
                );
            }
        }
    }

    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("jwt-private.pem");
    std::fs::write(&private, RSA_PRIVATE).unwrap();
    let garbage = dir.path().join("garbage.pem");
    std::fs::write(&garbage, "not a pem").unwrap();
    for (load, path, says) in [
        (
            JwtKey::rs256_pem_file as fn(&std::path::Path) -> Result<JwtKey, ServerError>,
            &private,
            "private key",
        ),
        (JwtKey::rs256_pem_file, &garbage, "not an RSA public key"),
        (
            JwtKey::eddsa_pem_file,
            &garbage,
            "not an Ed25519 public key",
        ),
    ] {
        let message = load(path).unwrap_err().to_string();
        assert!(message.contains(&path.display().to_string()), "{message}");
        assert!(message.contains(says), "{message}");
    }
    let public = dir.path().join("jwt-public.pem");
    std::fs::write(&public, RSA_PUBLIC).unwrap();
    assert!(JwtKey::rs256_pem_file(&public).is_ok());
}

/// A bad line of an API key file is reported with the file and its line number, never the
/// key.
#[test]
fn api_key_file_errors_name_the_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys");
    std::fs::write(
        &path,
        "# keys\napp=first-s3cr3t\n\nbroken-s3cr3t-line\nci:read=second-s3cr3t\n",
    )
    .unwrap();
    let error = ApiKey::parse_file(&path).unwrap_err();
    assert!(matches!(error, ServerError::Config(_)), "{error}");
    let message = error.to_string();
    assert!(
        message.contains(&format!("{} line 4", path.display())),
        "{message}"
    );
    assert!(!message.contains("s3cr3t"), "{message}");
    std::fs::write(&path, "# keys\napp=first-s3cr3t\nci:read=second-s3cr3t\n").unwrap();
    let keys = ApiKey::parse_file(&path).unwrap();
    assert_eq!(
        keys.iter().map(|k| k.name.as_str()).collect::<Vec<_>>(),
        ["app", "ci"]
    );
}
