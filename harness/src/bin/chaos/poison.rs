//! Poison rows: every class, injected twice; each must end parked with its
//! reason, and nothing else may be parked.

use std::collections::{BTreeMap, HashMap};

use uuid::Uuid;

/// Each class and a word its parking reason contains.
pub const CLASSES: [(&str, &str); 4] = [
    ("oversized payload", "Message size too large"),
    ("invalid topic name", "topic"),
    ("malformed headers", "malformed headers"),
    ("unknown topic (auto-create off)", "Unknown topic"),
];

/// Inserts one row of every class; returns (id, class) in `CLASSES` order.
pub async fn inject(db: &tokio_postgres::Client, run: &str, round: usize) -> Vec<(Uuid, &'static str)> {
    let sql = format!(
        "INSERT INTO public.{run} (topic, key, payload, headers) VALUES
           ('{run}.orders', 'poison-size-{round}', jsonb_build_object('big', repeat('x', 1100000)), '{{}}'),
           ('{run} invalid topic!', 'poison-name-{round}', '{{}}', '{{}}'),
           ('{run}.orders', 'poison-headers-{round}', '{{}}', '{{\"n\": 1}}'),
           ('{run}.never-created', 'poison-unknown-{round}', '{{}}', '{{}}')
         RETURNING id"
    );
    let ids = db.query(&sql, &[]).await.expect("inject poison");
    ids.iter().zip(CLASSES).map(|(r, (class, _))| (r.get::<_, Uuid>(0), class)).collect()
}

/// How the poison ended: per class (injected, parked with the right reason,
/// a reason seen), whether all is well, and rows parked that are not poison.
pub struct Verdict {
    pub by_class: BTreeMap<&'static str, (usize, usize, String)>,
    pub ok: bool,
    pub wrongly_parked: usize,
}

pub fn judge(poison: &[(Uuid, &'static str)], parked: &HashMap<Uuid, String>) -> Verdict {
    let mut by_class: BTreeMap<&'static str, (usize, usize, String)> = BTreeMap::new();
    let mut ok = true;
    for (id, class) in poison {
        let want = CLASSES.iter().find(|(c, _)| c == class).map(|(_, w)| *w).unwrap_or("");
        let e = by_class.entry(class).or_insert((0, 0, String::new()));
        e.0 += 1;
        match parked.get(id) {
            Some(err) if err.contains(want) => {
                e.1 += 1;
                e.2 = err.chars().take(60).collect();
            }
            other => {
                ok = false;
                eprintln!("chaos: poison row {id} ({class}) not parked with {want:?}: {other:?}");
            }
        }
    }
    let wrongly_parked = parked.keys().filter(|id| !poison.iter().any(|(p, _)| p == *id)).count();
    Verdict { by_class, ok, wrongly_parked }
}
