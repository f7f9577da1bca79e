//! Exactly-once names: Kafka `transactional.id`s and Postgres prepared
//! transaction ids (gids) of an outbox table's relays.
//!
//! `outbox-relay/<database>/<schema.table>/<relay.id>`, where `<database>` is
//! a stable hash of the Postgres system identifier and the database name. Two
//! services with their own databases can then share a Kafka cluster even when
//! their relays have the same `relay.id` (StatefulSet pods are `outbox-relay-0`
//! everywhere): their transactional ids differ by construction, so they never
//! fence each other. A batch's gid is `<transactional.id>/<32 hex>.<event>`:
//! `<event>` is the 32 hex digits of one event the batch handed to Kafka, or
//! `0` when it handed none (see [`batch_gid`]); gids of relays before 0.3 end
//! after the first 32 hex digits.
//!
//! Versions before 0.2 used `outbox-relay/<schema.table>/<relay.id>`. Prepared
//! batches under that *legacy* prefix are still found and resolved (with the
//! legacy transactional id as their owner), so an upgrade needs no manual step.

use super::{Store, StoreError};
use crate::config::TableName;

/// The transactional-id namespace of one outbox table in one database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TxnIds {
    /// `outbox-relay/<database>/<schema.table>/`: every current id of this table.
    pub prefix: String,
    /// `outbox-relay/<schema.table>/`: ids of relays before 0.2.
    pub legacy_prefix: String,
}

impl TxnIds {
    pub fn new(database_id: &str, table: &TableName) -> TxnIds {
        TxnIds {
            prefix: format!("outbox-relay/{database_id}/{}.{}/", table.schema, table.table),
            legacy_prefix: format!("outbox-relay/{}.{}/", table.schema, table.table),
        }
    }

    /// A relay's transactional id (also the prefix, with `/`, of its gids).
    pub fn transactional_id(&self, relay_id: &str) -> String {
        format!("{}{relay_id}", self.prefix)
    }

    /// Both prefixes, for listing every prepared batch of the table.
    pub fn prefixes(&self) -> Vec<String> {
        vec![self.prefix.clone(), self.legacy_prefix.clone()]
    }

    /// The transactional id that owns gid `gid` (`<owner>/<batch>`), if the
    /// gid belongs to this table.
    pub fn owner_of<'a>(&self, gid: &'a str) -> Option<&'a str> {
        if !gid.starts_with(&self.prefix) && !gid.starts_with(&self.legacy_prefix) {
            return None;
        }
        gid.rsplit_once('/').map(|(owner, _)| owner)
    }
}

/// Postgres keeps at most 199 bytes of a gid.
const MAX_GID: usize = 199;

/// The gid of a new batch of relay `transactional_id`. `sent`: one event the
/// batch handed to Kafka: if the batch's Kafka transaction committed, that
/// event is in its topic, which recovery can check when the decision record
/// is gone (`sink::find_event`).
pub fn batch_gid(transactional_id: &str, sent: Option<uuid::Uuid>) -> String {
    let batch = uuid::Uuid::new_v4().simple().to_string();
    let event = sent.map_or_else(|| "0".to_string(), |id| id.simple().to_string());
    let gid = format!("{transactional_id}/{batch}.{event}");
    if gid.len() <= MAX_GID {
        gid
    } else {
        // Too long a table name and relay id: no evidence beyond the decision record.
        format!("{transactional_id}/{batch}")
    }
}

/// What a gid says about the events its batch handed to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GidEvent {
    /// This event was handed to Kafka.
    Sent(uuid::Uuid),
    /// None was: nothing but the decision record could have been committed.
    NoneSent,
    /// The gid does not say (a relay before 0.3, or too long a name).
    Unknown,
}

pub fn gid_event(gid: &str) -> GidEvent {
    let batch = gid.rsplit_once('/').map_or(gid, |(_, b)| b);
    match batch.split_once('.') {
        Some((_, "0")) => GidEvent::NoneSent,
        Some((_, event)) => uuid::Uuid::try_parse(event).map_or(GidEvent::Unknown, GidEvent::Sent),
        None => GidEvent::Unknown,
    }
}

/// 12 hex digits of FNV-1a over `system_identifier/dbname`: stable across
/// versions and platforms (it is part of ids stored in Kafka and Postgres).
pub fn database_id(system_identifier: i64, dbname: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in format!("{system_identifier}/{dbname}").bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    format!("{:012x}", h >> 16)
}

impl Store {
    /// This table's transactional-id namespace (asks Postgres for its system
    /// identifier once).
    pub async fn txn_ids(&self) -> Result<TxnIds, StoreError> {
        if let Some(ids) = self.shared.txn_ids.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            return Ok(ids);
        }
        let client = self.client().await?;
        let row = client
            .query_one("SELECT system_identifier::int8, current_database()::text FROM pg_control_system()", &[])
            .await?;
        let ids = TxnIds::new(&database_id(row.get(0), row.get::<_, &str>(1)), self.table());
        *self.shared.txn_ids.lock().unwrap_or_else(|p| p.into_inner()) = Some(ids.clone());
        Ok(ids)
    }

    /// Every gid prefix of this table's prepared batches (current and legacy).
    pub async fn transactional_prefixes(&self) -> Vec<String> {
        match self.txn_ids().await {
            Ok(ids) => ids.prefixes(),
            Err(_) => vec![self.table().legacy_transactional_prefix()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_differ_between_databases_and_stay_stable() {
        let t = TableName::parse("public.outbox").unwrap();
        let a = TxnIds::new(&database_id(7712336889926938944, "orders"), &t);
        let b = TxnIds::new(&database_id(7712336889926938944, "billing"), &t);
        let c = TxnIds::new(&database_id(7712336889926938945, "orders"), &t);
        assert_ne!(a.transactional_id("outbox-relay-0"), b.transactional_id("outbox-relay-0"));
        assert_ne!(a.transactional_id("outbox-relay-0"), c.transactional_id("outbox-relay-0"));
        // Pinned: ids live in Kafka and Postgres; changing the hash would orphan them.
        assert_eq!(database_id(7712336889926938944, "orders"), database_id(7712336889926938944, "orders"));
        assert_eq!(database_id(1, "db"), "4baf4cf11c35");
        assert!(a.prefix.starts_with("outbox-relay/") && a.prefix.ends_with("/public.outbox/"));
    }

    #[test]
    fn a_gid_names_the_event_its_batch_sent() {
        let ids = TxnIds::new("0123456789ab", &TableName::parse("public.outbox").unwrap());
        let owner = ids.transactional_id("r1");
        let event = uuid::Uuid::new_v4();
        let gid = batch_gid(&owner, Some(event));
        assert_eq!(gid_event(&gid), GidEvent::Sent(event));
        assert_eq!(ids.owner_of(&gid), Some(owner.as_str()));
        assert_eq!(gid_event(&batch_gid(&owner, None)), GidEvent::NoneSent);
        assert_eq!(gid_event(&format!("{owner}/{}", "f".repeat(32))), GidEvent::Unknown);
        let long = format!("{}/{}", "x".repeat(150), "r");
        assert_eq!(gid_event(&batch_gid(&long, Some(event))), GidEvent::Unknown, "kept under 200 bytes");
        assert!(batch_gid(&long, Some(event)).len() <= MAX_GID);
    }

    #[test]
    fn the_owner_of_a_gid_is_found_under_both_prefixes() {
        let t = TableName::parse("public.outbox").unwrap();
        let ids = TxnIds::new("0123456789ab", &t);
        let gid = format!("{}/{}", ids.transactional_id("r1"), "f".repeat(32));
        assert_eq!(ids.owner_of(&gid), Some("outbox-relay/0123456789ab/public.outbox/r1"));
        let legacy = format!("outbox-relay/public.outbox/r1/{}", "e".repeat(32));
        assert_eq!(ids.owner_of(&legacy), Some("outbox-relay/public.outbox/r1"));
        assert_eq!(ids.owner_of("outbox-relay/public.other/r1/x"), None);
    }
}
