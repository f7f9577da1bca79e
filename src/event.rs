//! The one domain type both sides share: an outbox row on its way to Kafka.

use uuid::Uuid;

/// One outbox row, as claimed.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// The event ID, sent as the `event_id` header: the consumers' dedup key.
    pub id: Uuid,
    pub seq: i64,
    pub topic: String,
    pub key: Option<String>,
    /// The value exactly as stored (JSON text for jsonb); `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    /// The headers column as JSON text; the sink parses it.
    pub headers: Vec<u8>,
    pub attempts: i32,
    /// `created_at` in microseconds since the Unix epoch.
    pub created_at_us: i64,
    /// The Kafka partition the row names (migration 0005); `None`: the key
    /// decides.
    pub partition: Option<i32>,
    /// `ce_source` and `ce_type` from the columns `[cloudevents]` names, if any.
    pub ce_source: Option<String>,
    pub ce_type: Option<String>,
    /// When this relay claimed it (the start of its producer span).
    pub claimed: std::time::SystemTime,
}

/// The Kafka header that carries the event ID.
pub const EVENT_ID_HEADER: &str = "event_id";

/// Parses the headers column: a JSON object of string → string (a JSON `null`
/// value becomes a header without value). Anything else is a malformed row.
pub fn parse_headers(raw: &[u8], id: &Uuid) -> Result<Vec<(String, Option<String>)>, String> {
    let value: serde_json::Value =
        serde_json::from_slice(raw).map_err(|e| format!("malformed headers: not valid JSON ({e})"))?;
    let serde_json::Value::Object(map) = value else {
        return Err(format!("malformed headers: expected a JSON object of strings, got {}", kind(&value)));
    };
    let mut out = Vec::with_capacity(map.len());
    for (name, v) in map {
        if name.is_empty() {
            return Err("malformed headers: empty header name".into());
        }
        let v = match v {
            serde_json::Value::String(s) => Some(s),
            serde_json::Value::Null => None,
            other => {
                return Err(format!("malformed headers: value of {name:?} is {}, expected a string", kind(&other)))
            }
        };
        if name == EVENT_ID_HEADER {
            // The relay sets it from `id`; a different value would break dedup.
            if v.as_deref() != Some(id.to_string().as_str()) {
                return Err(format!(
                    "malformed headers: {EVENT_ID_HEADER:?} is reserved (the relay sets it to the row id)"
                ));
            }
            continue;
        }
        out.push((name, v));
    }
    Ok(out)
}

fn kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn string_headers_pass_through_in_any_order() {
        let id = Uuid::new_v4();
        let h = parse_headers(br#"{"traceparent":"00-ab-cd-01","tenant":"acme","empty":null}"#, &id).unwrap();
        assert!(h.contains(&("traceparent".into(), Some("00-ab-cd-01".into()))));
        assert!(h.contains(&("empty".into(), None)));
        assert_eq!(h.len(), 3);
    }

    #[test]
    fn malformed_headers_are_rejected_with_reason() {
        let id = Uuid::new_v4();
        for (raw, want) in [
            (&b"[1,2]"[..], "an array"),
            (br#"{"a":1}"#, "a number"),
            (br#"{"a":{"b":"c"}}"#, "an object"),
            (b"not json", "not valid JSON"),
            (br#"{"event_id":"x"}"#, "reserved"),
        ] {
            let err = parse_headers(raw, &id).unwrap_err();
            assert!(err.starts_with("malformed headers") && err.contains(want), "{err}");
        }
    }

    #[test]
    fn event_id_header_equal_to_id_is_accepted_and_not_duplicated() {
        let id = Uuid::new_v4();
        let raw = format!(r#"{{"event_id":"{id}"}}"#);
        assert!(parse_headers(raw.as_bytes(), &id).unwrap().is_empty());
    }
}
