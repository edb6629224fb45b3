//! Redaction of named fields in an event's `data`.

use std::borrow::Cow;
use std::sync::Arc;

use ksync_core::{Event, Middleware, MiddlewareError};
use serde_json::Value;

use crate::error::Error;
use crate::types::TypeSet;

/// What [`Redact`] puts in place of a redacted value by default.
pub const REDACTED: &str = "[redacted]";

/// Replaces (or removes) named fields of `data` before events leave (or after they arrive).
///
/// A path is dot-separated object keys: `password`, `card.number`. Arrays on the way are
/// walked element by element, so `items.secret` redacts `secret` in every element of
/// `items`. A key whose name contains dots matches too: `card.number` also redacts
/// `{"card.number": ..}` (and `a.b.c` redacts `{"a": {"b.c": ..}}`). Paths that are absent
/// leave the event unchanged.
///
/// Outgoing, it is a one-sided transform: the emitter keeps the fields, everyone else holds
/// the redacted copy under the same `(id, version)`. Should the emitter read its own event back
/// (its acknowledgement lost with a dropped connection, or the room read from the start, e.g.
/// through another address), the two copies are a `concurrent-edit` conflict, settled like any
/// other (last-write-wins writes one of them as a new version, so the local copy may lose the
/// fields). Where the local copy need not keep them, redact before emitting
/// ([`Redact::redact`]); where replicas holding a key must read them, encrypt them instead
/// ([`Encrypt`](crate::Encrypt) / [`Decrypt`](crate::Decrypt) give every side the same content).
///
/// ```
/// use ksync_core::{Event, Middleware};
/// use ksync_middleware::Redact;
/// use serde_json::json;
/// let redact = Redact::fields(["password", "card.number"])?;
/// let event = Event::new("1", "signup", json!({"user": "ann", "password": "pw", "card": {"number": "4111", "exp": "12/29"}}), 1);
/// let out = redact.process(event)?.unwrap();
/// assert_eq!(out.data, json!({"user": "ann", "password": "[redacted]", "card": {"number": "[redacted]", "exp": "12/29"}}));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct Redact {
    paths: Arc<Vec<Vec<String>>>,
    /// `None`: remove the field.
    replacement: Option<Value>,
    types: TypeSet,
}

impl Redact {
    /// Redacts these dot-separated paths, replacing each value with [`REDACTED`]. An empty path
    /// or an empty segment is [`Error::InvalidPath`].
    pub fn fields<I, S>(paths: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let paths = paths
            .into_iter()
            .map(|p| {
                let p = p.as_ref();
                let segments: Vec<String> = p.split('.').map(str::to_owned).collect();
                if segments.iter().any(String::is_empty) {
                    return Err(Error::InvalidPath(p.to_owned()));
                }
                Ok(segments)
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            paths: Arc::new(paths),
            replacement: Some(Value::String(REDACTED.into())),
            types: TypeSet::default(),
        })
    }

    /// Puts `value` in place of redacted values instead of [`REDACTED`].
    #[must_use]
    pub fn replace_with(mut self, value: Value) -> Self {
        self.replacement = Some(value);
        self
    }

    /// Removes redacted fields instead of replacing their values.
    #[must_use]
    pub fn remove(mut self) -> Self {
        self.replacement = None;
        self
    }

    /// Redacts only events of these types.
    #[must_use]
    pub fn only_types<I, S>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.types = TypeSet::only(types);
        self
    }

    /// Redacts `data` in place.
    pub fn redact(&self, data: &mut Value) {
        for path in self.paths.iter() {
            redact_path(data, path, self.replacement.as_ref());
        }
    }
}

fn redact_path(value: &mut Value, path: &[String], replacement: Option<&Value>) {
    if path.is_empty() {
        return;
    }
    match value {
        Value::Object(map) => {
            // A key may itself contain dots (`{"card.number": ..}`): every way of reading the
            // path's first segments as one key is redacted, so a secret is never missed
            // because of how its name is spelled.
            for taken in 1..=path.len() {
                let key = if taken == 1 {
                    Cow::Borrowed(path[0].as_str())
                } else {
                    Cow::Owned(path[..taken].join("."))
                };
                let rest = &path[taken..];
                if rest.is_empty() {
                    match replacement {
                        Some(r) => {
                            if let Some(v) = map.get_mut(key.as_ref()) {
                                *v = r.clone();
                            }
                        }
                        None => {
                            map.remove(key.as_ref());
                        }
                    }
                } else if let Some(child) = map.get_mut(key.as_ref()) {
                    redact_path(child, rest, replacement);
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                redact_path(item, path, replacement);
            }
        }
        _ => {}
    }
}

impl Middleware for Redact {
    fn process(&self, mut event: Event) -> Result<Option<Event>, MiddlewareError> {
        if self.types.contains(&event.event_type) {
            self.redact(&mut event.data);
        }
        Ok(Some(event))
    }

    fn name(&self) -> &str {
        "redact"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(redact: &Redact, data: Value) -> Value {
        redact
            .process(Event::new("1", "t", data, 1))
            .expect("ok")
            .expect("kept")
            .data
    }

    #[test]
    fn nested_paths_arrays_and_absent_fields() {
        let r = Redact::fields(["password", "card.number", "items.secret"]).expect("paths");
        assert_eq!(
            run(
                &r,
                json!({"password": {"deep": 1}, "card": {"number": 4111, "cvc": 1},
                       "items": [{"secret": 1, "ok": 2}, {"ok": 3}, 7]})
            ),
            json!({"password": "[redacted]", "card": {"number": "[redacted]", "cvc": 1},
                   "items": [{"secret": "[redacted]", "ok": 2}, {"ok": 3}, 7]})
        );
        // Absent paths, scalars and a non-object on the way change nothing.
        assert_eq!(run(&r, json!({"card": "none"})), json!({"card": "none"}));
        assert_eq!(run(&r, json!(null)), json!(null));
        assert_eq!(run(&r, json!({"other": 1})), json!({"other": 1}));
    }

    #[test]
    fn keys_with_dots_in_their_names() {
        let r = Redact::fields(["card.number", "a.b.c"]).expect("paths");
        assert_eq!(
            run(
                &r,
                json!({"card.number": "4111", "a": {"b.c": 1, "b": {"c": 2}}, "a.b": {"c": 3},
                       "a.b.c": 4})
            ),
            json!({"card.number": "[redacted]", "a": {"b.c": "[redacted]", "b": {"c": "[redacted]"}},
                   "a.b": {"c": "[redacted]"}, "a.b.c": "[redacted]"})
        );
        assert_eq!(
            run(&r, json!([{"card.number": 5}, {"a": [{"b.c": 6}]}])),
            json!([{"card.number": "[redacted]"}, {"a": [{"b.c": "[redacted]"}]}])
        );
        let removed = Redact::fields(["card.number"]).expect("paths").remove();
        assert_eq!(
            run(
                &removed,
                json!({"card.number": "4111", "card": {"number": 1, "exp": 2}})
            ),
            json!({"card": {"exp": 2}})
        );
    }

    #[test]
    fn remove_replace_and_type_selection() {
        let removed = Redact::fields(["a.b"]).expect("paths").remove();
        assert_eq!(
            run(&removed, json!({"a": {"b": 1, "c": 2}})),
            json!({"a": {"c": 2}})
        );
        let replaced = Redact::fields(["a"])
            .expect("paths")
            .replace_with(json!(null));
        assert_eq!(run(&replaced, json!({"a": 1})), json!({"a": null}));
        let typed = Redact::fields(["a"]).expect("paths").only_types(["secret"]);
        assert_eq!(
            run(&typed, json!({"a": 1})),
            json!({"a": 1}),
            "type t is not selected"
        );
    }

    #[test]
    fn bad_paths_are_typed_errors() {
        for bad in ["", "a..b", ".a", "a."] {
            assert!(
                matches!(Redact::fields([bad]), Err(Error::InvalidPath(p)) if p == bad),
                "{bad:?}"
            );
        }
    }
}
