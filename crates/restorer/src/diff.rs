//! The difference between two points `from` < `to` of one generation,
//! computed from the keys the changes between them touched: memory grows
//! with those keys, never with the database or the number of revisions.
//!
//! 1. Every event of revisions `from + 1 ..= to` is fed to [`DiffBuilder::change`]
//!    in order: the last one of a key is its state at `to`. The first one
//!    tells whether the key existed at `from` (etcd facts): a put with
//!    version 1 created it (absent at `from`); a later version, or a delete
//!    (etcd never records deleting a missing key), means it existed.
//! 2. The state at `from` of the keys that existed is looked up in earlier
//!    *stages*, newest first: the segments after the base snapshot up to
//!    `from`, then the base snapshot's `key` bucket (only if a key is still
//!    [`DiffBuilder::pending`]). Each stage's events are fed in revision
//!    order to [`DiffBuilder::earlier`]; inside a stage the last event of a
//!    key wins, and a key found by a newer stage is not touched by an older.
//! 3. [`DiffBuilder::finish`] pairs the states, sorted by key.

use std::collections::BTreeMap;

use etcdpitr_common::segment::{Event, EventKind};
use etcdpitr_common::Revision;

/// A live key's state at one point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyState {
    /// Revision the key was created at.
    pub create_revision: Revision,
    /// Revision of its last modification.
    pub mod_revision: Revision,
    /// Its version.
    pub version: i64,
    /// Its lease (0 for none).
    pub lease: i64,
    /// Length of its value in bytes.
    pub value_size: u64,
    /// Its value, when values are kept.
    pub value: Option<Vec<u8>>,
}

impl KeyState {
    /// The state an event leaves its key in (`None`: deleted).
    pub fn after(event: &Event, keep_value: bool) -> Option<Self> {
        (event.kind == EventKind::Put).then(|| Self {
            create_revision: event.create_revision,
            mod_revision: event.mod_revision,
            version: event.version,
            lease: event.lease,
            value_size: event.value.len() as u64,
            value: keep_value.then(|| event.value.clone()),
        })
    }
}

/// How a key differs between the two points.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Absent at `from`, live at `to`.
    Added,
    /// Live at both, modified in between.
    Changed,
    /// Live at `from`, absent at `to`.
    Deleted,
}

impl Change {
    /// The word used in both output forms.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Added => "added",
            Self::Changed => "changed",
            Self::Deleted => "deleted",
        }
    }
}

/// One key of the difference.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyDiff {
    /// The key.
    pub key: Vec<u8>,
    /// How it differs.
    pub change: Change,
    /// Its state at `from` (`None` when added).
    pub before: Option<KeyState>,
    /// Its state at `to` (`None` when deleted).
    pub after: Option<KeyState>,
}

/// A key that the changes say existed at `from`, but no earlier stage holds
/// live: the archive contradicts itself.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("key {} was modified after revision {from} (first at revision {first_change}) but the archive does not hold it live at revision {from}", .key.escape_ascii())]
pub struct MissingBefore {
    /// The key.
    pub key: Vec<u8>,
    /// The earlier point.
    pub from: Revision,
    /// Its first change after `from`.
    pub first_change: Revision,
}

/// A touched key's state at `from`.
#[derive(Clone, Debug)]
enum Before {
    /// It did not exist (its first change created it).
    Absent,
    /// It existed; not found yet.
    Pending,
    /// Found by stage `stage` (`None`: deleted there).
    Found { stage: u32, state: Option<KeyState> },
}

#[derive(Clone, Debug)]
struct Touched {
    first_change: Revision,
    before: Before,
    after: Option<KeyState>,
}

/// Accumulates a difference (see the module docs for the protocol).
#[derive(Debug)]
pub struct DiffBuilder {
    from: Revision,
    prefix: Vec<u8>,
    keep_values: bool,
    keys: BTreeMap<Vec<u8>, Touched>,
    pending: usize,
    stage: u32,
}

impl DiffBuilder {
    /// A difference from revision `from`, of the keys starting with
    /// `prefix`, keeping values if `keep_values`.
    pub fn new(from: Revision, prefix: &[u8], keep_values: bool) -> Self {
        Self {
            from,
            prefix: prefix.to_vec(),
            keep_values,
            keys: BTreeMap::new(),
            pending: 0,
            stage: 0,
        }
    }

    /// Feeds an event of revisions `from + 1 ..= to`, in revision order.
    pub fn change(&mut self, event: &Event) {
        if !event.key.starts_with(&self.prefix) {
            return;
        }
        let after = KeyState::after(event, self.keep_values);
        if let Some(t) = self.keys.get_mut(&event.key) {
            t.after = after;
            return;
        }
        let existed = event.kind == EventKind::Delete || event.version > 1;
        if existed {
            self.pending += 1;
        }
        self.keys.insert(
            event.key.clone(),
            Touched {
                first_change: event.mod_revision,
                before: if existed {
                    Before::Pending
                } else {
                    Before::Absent
                },
                after,
            },
        );
    }

    /// Number of touched keys whose state at `from` is not found yet.
    pub fn pending(&self) -> usize {
        self.pending
    }

    /// Starts the next (older) stage of the look-up.
    pub fn next_stage(&mut self) {
        self.stage += 1;
    }

    /// Feeds an event at or before `from` of the current stage, in revision
    /// order; ignored unless its key was touched and is not found by a
    /// newer stage.
    pub fn earlier(&mut self, event: &Event) {
        let Some(t) = self.keys.get_mut(&event.key) else {
            return;
        };
        match &t.before {
            Before::Absent => {}
            Before::Found { stage, .. } if *stage != self.stage => {}
            found => {
                if matches!(found, Before::Pending) {
                    self.pending -= 1;
                }
                t.before = Before::Found {
                    stage: self.stage,
                    state: KeyState::after(event, self.keep_values),
                };
            }
        }
    }

    /// The difference, sorted by key; keys created and deleted between the
    /// points are left out.
    ///
    /// # Errors
    /// [`MissingBefore`] for the first key that existed at `from` by its
    /// changes but is not live there by the earlier stages.
    pub fn finish(self) -> Result<Vec<KeyDiff>, MissingBefore> {
        let from = self.from;
        let mut out = Vec::new();
        for (key, t) in self.keys {
            let before = match t.before {
                Before::Absent => None,
                Before::Found {
                    state: Some(state), ..
                } => Some(state),
                Before::Pending | Before::Found { state: None, .. } => {
                    return Err(MissingBefore {
                        key,
                        from,
                        first_change: t.first_change,
                    })
                }
            };
            let change = match (&before, &t.after) {
                (None, Some(_)) => Change::Added,
                (Some(_), None) => Change::Deleted,
                (Some(b), Some(a)) if a.mod_revision != b.mod_revision => Change::Changed,
                // Created and deleted in between, or (never for a touched
                // key) unmodified.
                (None, None) | (Some(_), Some(_)) => continue,
            };
            out.push(KeyDiff {
                key,
                change,
                before,
                after: t.after,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(key: &str, rev: Revision, created: Revision, version: i64, value: &str) -> Event {
        Event {
            kind: EventKind::Put,
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
            create_revision: created,
            mod_revision: rev,
            version,
            lease: 0,
        }
    }

    fn del(key: &str, rev: Revision) -> Event {
        Event {
            kind: EventKind::Delete,
            key: key.as_bytes().to_vec(),
            value: Vec::new(),
            create_revision: 0,
            mod_revision: rev,
            version: 0,
            lease: 0,
        }
    }

    fn keys(d: &[KeyDiff]) -> Vec<(&str, Change)> {
        d.iter()
            .map(|k| (std::str::from_utf8(&k.key).unwrap(), k.change))
            .collect()
    }

    #[test]
    fn changes_pair_with_the_states_of_earlier_stages() {
        // From 10 to 20. Base snapshot at 5 holds a (v1 at 3), b (v1 at 4),
        // d (deleted at 5 after v1 at 2); segments 6..=10 update a at 8.
        let mut d = DiffBuilder::new(10, b"", true);
        for e in [
            put("a", 11, 3, 3, "a3"),
            put("n", 12, 12, 1, "new"),
            del("b", 13),
            put("t", 14, 14, 1, "tmp"),
            del("t", 15),
            put("b", 16, 16, 1, "b again"),
            put("c", 17, 17, 1, "c"),
            put("a", 18, 3, 4, "a4"),
        ] {
            d.change(&e);
        }
        // a and b existed at 10; n, t and c did not.
        assert_eq!(d.pending(), 2);
        // Stage 1: segments 6..=10.
        d.next_stage();
        d.earlier(&put("a", 8, 3, 2, "a2"));
        d.earlier(&put("x", 9, 9, 1, "untouched"));
        assert_eq!(d.pending(), 1);
        // Stage 2: the base snapshot, in revision order; a's older state
        // there must not replace the newer one of stage 1.
        d.next_stage();
        d.earlier(&put("a", 3, 3, 1, "a1"));
        d.earlier(&put("b", 4, 4, 1, "b1"));
        assert_eq!(d.pending(), 0);
        let out = d.finish().unwrap();
        assert_eq!(
            keys(&out),
            vec![
                ("a", Change::Changed),
                ("b", Change::Changed),
                ("c", Change::Added),
                ("n", Change::Added),
            ]
        );
        let a = &out[0];
        assert_eq!(a.before.as_ref().unwrap().mod_revision, 8);
        assert_eq!(
            a.before.as_ref().unwrap().value.as_deref(),
            Some(&b"a2"[..])
        );
        assert_eq!(a.after.as_ref().unwrap().mod_revision, 18);
        assert_eq!(a.after.as_ref().unwrap().value_size, 2);
        // b was deleted and created again: changed, with a new create revision.
        let b = &out[1];
        assert_eq!(b.before.as_ref().unwrap().create_revision, 4);
        assert_eq!(b.after.as_ref().unwrap().create_revision, 16);
    }

    #[test]
    fn deletions_and_the_last_event_of_a_stage_win() {
        let mut d = DiffBuilder::new(10, b"/p/", false);
        d.change(&del("/p/gone", 11));
        d.change(&put("/q/outside", 12, 12, 1, "x"));
        d.change(&put("/p/upd", 13, 2, 5, "v5"));
        assert_eq!(d.pending(), 2);
        d.next_stage();
        // In one stage, later events of a key replace earlier ones.
        d.earlier(&put("/p/gone", 2, 2, 1, "1"));
        d.earlier(&put("/p/gone", 6, 2, 2, "22"));
        d.earlier(&put("/p/upd", 9, 2, 4, "v4"));
        let out = d.finish().unwrap();
        assert_eq!(
            keys(&out),
            vec![("/p/gone", Change::Deleted), ("/p/upd", Change::Changed)]
        );
        let gone = out[0].before.as_ref().unwrap();
        assert_eq!((gone.mod_revision, gone.value_size), (6, 2));
        assert_eq!(gone.value, None, "values are kept only when asked");
        assert!(out[0].after.is_none());
    }

    #[test]
    fn a_key_the_archive_does_not_hold_at_from_is_an_error() {
        // Deleted in the range, but deleted (or never seen) before it.
        let mut d = DiffBuilder::new(10, b"", false);
        d.change(&del("k", 11));
        d.next_stage();
        d.earlier(&put("k", 3, 3, 1, "v"));
        d.earlier(&del("k", 7));
        let e = d.finish().unwrap_err();
        assert_eq!(
            e,
            MissingBefore {
                key: b"k".to_vec(),
                from: 10,
                first_change: 11
            }
        );
        assert!(e
            .to_string()
            .contains("key k was modified after revision 10"));
        let mut d = DiffBuilder::new(10, b"", false);
        d.change(&put("\x00k", 11, 2, 2, "v"));
        let e = d.finish().unwrap_err();
        assert!(e.to_string().contains("key \\x00k"), "{e}");
    }

    #[test]
    fn nothing_touched_is_an_empty_difference() {
        let d = DiffBuilder::new(10, b"", false);
        assert_eq!(d.pending(), 0);
        assert!(d.finish().unwrap().is_empty());
    }
}
